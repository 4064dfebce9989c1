"""deploy/station/inventory-agent.service: systemd-analyze verify where systemd is present, and its keys parsed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import REPO

from agent.config import OutboxConfig
from agent.startup import DEFAULT_ENGINE_CACHE, ENV_CONFIG, ENV_ENGINE_CACHE

UNIT = REPO / "deploy" / "station" / "inventory-agent.service"
VENV_PYTHON = "/opt/inventory-agent/venv/bin/python"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; systemd allows a key more than once (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{UNIT}: cannot parse {raw!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{UNIT}: [{section}] {key}= expected once, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> dict:
    return parse_unit(UNIT.read_text())


def test_systemd_analyze_verify_is_clean(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed; the parsed checks below still run")
    # verify checks that ExecStart's binary exists: point it at this venv's python, change nothing else
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(VENV_PYTHON, sys.executable))
    proc = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if copy.name in line]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_restarts_and_runs_as_a_dedicated_user(unit):
    assert one(unit, "Service", "Restart") in ("always", "on-failure")
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "User") not in ("", "root", "0")
    assert "video" in one(unit, "Service", "SupplementaryGroups").split()
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_state_and_cache_directories_are_where_the_agent_writes(unit):
    state = one(unit, "Service", "StateDirectory")
    cache = one(unit, "Service", "CacheDirectory")
    assert OutboxConfig().path.parent == Path("/var/lib") / state
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    assert Path(env[ENV_ENGINE_CACHE]) == DEFAULT_ENGINE_CACHE
    assert DEFAULT_ENGINE_CACHE.is_relative_to(Path("/var/cache") / cache)
    assert env[ENV_CONFIG].startswith("/etc/")


def test_secrets_come_from_an_environment_file_and_start_goes_through_startup(unit):
    assert one(unit, "Service", "EnvironmentFile").lstrip("-").startswith("/etc/inventory-agent/")
    assert one(unit, "Service", "ExecStart").endswith("-m agent.startup start")
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert float(one(unit, "Service", "TimeoutStopSec")) >= 10   # > the agent's shutdown_flush_s


def test_hardening_leaves_cameras_and_the_argus_socket_reachable(unit):
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert values(unit, "Service", "PrivateTmp") in ([], ["no"])        # /tmp/argus_socket for CSI cameras
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])    # /dev/video*, /dev/nvhost-*
