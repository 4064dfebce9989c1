"""docs/deploy.md's commands against the files they deploy, as a warehouse engineer runs them.

No Docker engine runs here: what the commands make (files, modes, groups, packages) is read from the doc's own
code blocks and checked against what compose.yaml, the Dockerfiles and the systemd unit need, with real file
permissions where that is what decides (as root: a process with the container's uid and groups opens the file).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from deploy_support import REPO, SHIPPED_CONF

DOCS = REPO / "docs" / "deploy.md"
CENTRAL = REPO / "deploy" / "central"
COMPOSE = CENTRAL / "compose.yaml"
CENTRAL_DOCKERFILE = CENTRAL / "Dockerfile"
JETSON_DOCKERFILE = REPO / "Dockerfile.jetson"
UNIT = REPO / "deploy" / "station" / "inventory-agent.service"
MOSQUITTO_UID = 1883          # uid and gid of the eclipse-mosquitto image's user


def doc_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under ``heading`` (comments dropped, continuations joined)."""
    section = DOCS.read_text().split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0].replace("\\\n", " ")
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def central_image_user() -> tuple[int, int]:
    user = re.search(r"(?m)^USER (\d+):(\d+)$", CENTRAL_DOCKERFILE.read_text())
    assert user, f"{CENTRAL_DOCKERFILE}: no numeric USER uid:gid"
    return int(user.group(1)), int(user.group(2))


def service_mounts(svc: dict) -> list[dict]:
    """Every volume of a service as the long syntax has it (short ``src:dst[:ro]`` turned into that form)."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            out.append(vol)
            continue
        source, target, *opts = vol.split(":")
        kind = "bind" if source.startswith((".", "/")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in opts,
                    "bind": {"create_host_path": True}})     # what Docker does for a short-syntax bind
    return out


# ---------------------------------------------------------------- central stack: the TLS key

def docs_treatment(name: str) -> tuple[int, int | None]:
    """The mode and group the Central stack commands leave ``secrets/<name>`` with (chmod and chgrp, globs too;
    mode 0600 and group None where they give none: the file as a umask-077 host, openssl or mosquitto_passwd
    >= 2.0.16 writes it)."""
    mode, group = 0o600, None
    for line in doc_block("## Central stack"):
        for part in re.split(r"&&|;", line):
            words = [w for w in shlex.split(part) if w != "sudo"]
            if len(words) > 2 and words[0] in ("chmod", "chgrp") and \
                    any(fnmatch.fnmatchcase(f"secrets/{name}", w) for w in words[2:]):
                if words[0] == "chmod":
                    mode = int(words[1], 8)
                else:
                    group = int(words[1])
    return mode, group


def shown(treatment: tuple[int, int | None]) -> str:
    return f"mode {treatment[0]:o}, group {treatment[1] if treatment[1] is not None else 'unchanged'}"


def made_as_the_docs_say(path: Path, name: str) -> None:
    """``path`` as the doc's commands leave ``secrets/<name>``: written 0600 by the admin's own user (uid 1000; as
    openssl writes a private key, mosquitto_passwd >= 2.0.16 its file, and `>` any file on a umask-077 host), then
    their chmod/chgrp."""
    mode, group = docs_treatment(name)
    path.write_text("secret\n")
    os.chmod(path, 0o600)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file the admin's owner and the docs' group")
    os.chown(path, 1000, group if group is not None else 1000)
    os.chmod(path, mode)


def readable_by(path: Path, uid: int, gid: int, groups: list[int]) -> bool:
    """Whether a process with this uid, gid and supplementary groups can open ``path``: really tried as root (the
    kernel decides), else worked out from the mode bits as the kernel would (no ACLs here)."""
    if os.geteuid() == 0:
        proc = subprocess.run(["/bin/cat", str(path)], user=uid, group=gid, extra_groups=groups,
                              capture_output=True, timeout=30)
        return proc.returncode == 0
    st = path.stat()
    if uid == st.st_uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == gid or st.st_gid in groups:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path sits under a 0700 folder of its own)."""
    folder = Path(tempfile.mkdtemp(prefix="deploy-review-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_every_service_that_serves_https_can_read_the_key_the_docs_make(open_dir):
    """docs/deploy.md makes secrets/certs/server.key 0640 and group 1883 so the broker (uid 1883) reads it; review,
    bundle-server and dashboard mount the same key and run as the central image's uid 10002. Without group 1883
    (compose group_add) they could not open it and would exit at every restart."""
    key = open_dir / "server.key"
    made_as_the_docs_say(key, "certs/server.key")
    uid, gid = central_image_user()
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    readers = {"mosquitto": (MOSQUITTO_UID, MOSQUITTO_UID, [])}
    for name, svc in services.items():
        if name == "mosquitto":
            continue
        key_args = [a for a in svc.get("command", []) if a.endswith("server.key")]
        if key_args:
            mounted = [m for m in service_mounts(svc) if key_args[0].startswith(m["target"].rstrip("/") + "/")]
            assert mounted and mounted[0]["source"].startswith("./secrets/certs"), f"services.{name}: key not mounted"
            readers[name] = (uid, gid, [int(g) for g in svc.get("group_add", [])])
    assert set(readers) >= {"mosquitto", "review", "bundle-server", "dashboard"}
    cannot = [name for name, (u, g, extra) in readers.items() if not readable_by(key, u, g, extra)]
    assert not cannot, f"{COMPOSE}: {cannot} cannot read server.key left by {DOCS.name} as " \
                       f"{shown(docs_treatment('certs/server.key'))}"


def test_the_broker_can_open_the_password_file_the_docs_make(open_dir):
    """mosquitto 2 drops to uid/gid 1883 before it opens password_file (src/mosquitto.c: drop_privileges() comes
    before mosquitto_security_init()), and mosquitto_passwd >= 2.0.16 writes that file 0600 for the admin who ran
    it: unless the docs give it the broker's group, the broker exits ("Unable to open pwfile") at every restart and
    the whole stack waits on it."""
    passwd = open_dir / "passwd"
    made_as_the_docs_say(passwd, "passwd")
    assert readable_by(passwd, MOSQUITTO_UID, MOSQUITTO_UID, []), \
        f"{DOCS.name}: the broker (uid 1883) cannot open secrets/passwd left as {shown(docs_treatment('passwd'))}"
    assert not passwd.stat().st_mode & 0o007, f"{DOCS.name}: secrets/passwd is readable by every user"


def test_every_compose_secret_the_docs_make_is_readable_by_the_services_that_use_it(open_dir):
    """Outside a swarm, compose mounts a file secret as the file itself, owner and mode kept (its uid/gid/mode
    fields are ignored): a password file an admin with umask 077 writes (0600, their own) is one the central
    services (uid/gid 10002) cannot read, and ingest, review and the dashboard exit at every restart."""
    compose = yaml.safe_load(COMPOSE.read_text())
    uid, gid = central_image_user()
    cannot = []
    for name, svc in compose["services"].items():
        for secret in svc.get("secrets", []):
            source = compose["secrets"][secret]["file"]
            assert source.startswith("./secrets/"), f"secrets.{secret}: {source}"
            path = open_dir / secret
            made_as_the_docs_say(path, source.removeprefix("./secrets/"))
            if not readable_by(path, uid, gid, [int(g) for g in svc.get("group_add", [])]):
                cannot.append(f"services.{name}: {source} ({shown(docs_treatment(source.removeprefix('./secrets/')))})")
            assert not path.stat().st_mode & 0o007, f"{DOCS.name}: {source} is readable by every user"
    assert not cannot, f"cannot read as {DOCS.name} leaves them: {cannot}"


def files_each_container_opens(compose: dict) -> list[tuple[str, str, tuple[int, int, list[int]]]]:
    """(service, path under secrets/, (uid, gid, groups)) for every file of secrets/ a container opens: the broker
    the files its mosquitto.conf names, the central services the files their commands name."""
    uid, gid = central_image_user()
    opened = []
    for name, svc in compose["services"].items():
        if name == "mosquitto":
            wanted = re.findall(r"(?m)^(?:password_file|cafile|certfile|keyfile) (\S+)", SHIPPED_CONF.read_text())
            who = (MOSQUITTO_UID, MOSQUITTO_UID, [])
        else:
            wanted = [a for a in svc.get("command", []) if a.startswith("/")]
            who = (uid, gid, [int(g) for g in svc.get("group_add", [])])
        for path in wanted:
            for m in service_mounts(svc):
                target = m["target"].rstrip("/")
                if m["source"].startswith("./secrets/") and (path == target or path.startswith(target + "/")):
                    opened.append((name, (m["source"] + path[len(target):]).removeprefix("./secrets/"), who))
    return opened


def test_every_secrets_file_a_container_opens_is_readable_by_its_user_whatever_the_umask(open_dir):
    """The CA, the certificate, the key and the password file as the docs leave them on a host whose umask is 077
    (openssl and mosquitto_passwd write 0600 there): each container that opens one can (the broker as 1883, the
    central services as 10002 with group_add)."""
    opened = files_each_container_opens(yaml.safe_load(COMPOSE.read_text()))
    assert {("mosquitto", "passwd"), ("mosquitto", "certs/server.key"), ("ingest", "certs/ca.crt"),
            ("review", "certs/server.key")} <= {(svc, rel) for svc, rel, _ in opened}, opened
    cannot = []
    for i, (svc, rel, (uid, gid, groups)) in enumerate(opened):
        path = open_dir / f"{i}-{Path(rel).name}"
        made_as_the_docs_say(path, rel)
        if not readable_by(path, uid, gid, groups):
            cannot.append(f"{svc} (uid {uid}) cannot open secrets/{rel} ({shown(docs_treatment(rel))})")
    assert not cannot, f"{DOCS.name}, Central stack: " + "; ".join(cannot)


def test_every_secrets_folder_a_container_mounts_can_be_entered_whatever_the_umask():
    """secrets/certs is mounted as a folder, its own mode kept: made by `mkdir -p` on a umask-077 host it is 0700,
    the admin's, and no container user could reach the files in it, whatever their modes."""
    compose = yaml.safe_load(COMPOSE.read_text())
    folders = {m["source"].removeprefix("./secrets/") for svc in compose["services"].values()
               for m in service_mounts(svc) if m["source"].startswith("./secrets/")
               and not Path(m["source"]).suffix and m["source"] != "./secrets/passwd"}
    assert folders == {"certs"}, folders
    modes = {}
    for line in doc_block("## Central stack"):
        words = [w for w in shlex.split(line.split("&&")[0]) if w != "sudo"]
        if words[:1] == ["mkdir"]:
            mode = int(words[words.index("-m") + 1], 8) if "-m" in words else 0o700
            modes.update({w.removeprefix("secrets/"): mode for w in words[1:] if w.startswith("secrets/")})
        if words[:1] == ["chmod"]:
            modes.update({w.removeprefix("secrets/"): int(words[1], 8) for w in words[2:] if w.startswith("secrets/")})
    for folder in folders:
        assert folder in modes, f"{DOCS.name}: Central stack never makes secrets/{folder}"
        assert modes[folder] & 0o001, f"{DOCS.name}: secrets/{folder} is left {modes[folder]:o}: no container enters it"


# ---------------------------------------------------------------- central stack: files beside compose.yaml

def made_by_central_docs() -> set[str]:
    """Paths (relative to deploy/central) that the doc's Central stack commands create."""
    made: set[str] = set()
    for line in doc_block("## Central stack"):
        for part in re.split(r"&&|;", line):
            words = shlex.split(part.replace("<(", "( ").replace("<<<", " "))
            if not words:
                continue
            for flag in ("-out", "-keyout", ">", "-c", "-b"):      # openssl -out/-keyout, >, mosquitto_passwd
                for i, word in enumerate(words[:-1]):
                    if word == flag:
                        made.add(words[i + 1])
            made |= {w[1:] for w in words if w.startswith(">") and len(w) > 1}
            if words[:2] == ["mkdir", "-p"]:
                made |= set(words[2:])
            if words[0] == "cp":
                made.add(words[-1])
    return {m.rstrip("/") for m in made if not m.startswith("-")}


def test_every_bind_mount_is_committed_or_made_by_the_docs_and_never_made_by_docker():
    """A bind source that does not exist is made by Docker as an empty root-owned directory (short syntax): a
    missing labels.json turned review into a restart loop ('--labels-from ...: No such file or directory')."""
    made = made_by_central_docs()
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    problems = []
    for name, svc in services.items():
        for m in service_mounts(svc):
            if m["type"] != "bind":
                continue
            rel = m["source"].removeprefix("./")
            committed = (CENTRAL / rel).exists()
            by_docs = any(rel == p or rel.startswith(p + "/") or p.startswith(rel + "/") for p in made)
            if not (committed or by_docs):
                problems.append(f"services.{name}: {m['source']} is neither committed nor made by {DOCS.name}")
            if not committed and m.get("bind", {}).get("create_host_path", True):
                problems.append(f"services.{name}: {m['source']} is not committed: give it "
                                "bind: {create_host_path: false} so a missed step fails at `up`, not in a restart loop")
    assert not problems, "\n".join(problems)


def test_the_doc_parser_sees_what_the_doc_makes():
    made = made_by_central_docs()
    assert {"secrets/passwd", "secrets/certs/server.key", "secrets/review.token"} <= made, made


# ---------------------------------------------------------------- station without containers: the venv

def pip_installs(lines: list[str]) -> list[list[str]]:
    """The arguments of every ``pip install`` in these command lines."""
    found = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in ("&&", "||", ";", "|", "<<<", ">", "<"):
                for i in range(len(command) - 1):
                    if command[i].endswith("pip") and command[i + 1] == "install":
                        found.append(command[i + 2:])
                command = []
            else:
                command.append(word)
    return found


def test_the_systemd_venv_gets_every_python_package_the_jetson_image_installs():
    """JetPack brings TensorRT and OpenCV (the venv sees them through --system-site-packages) but no ONNX Runtime;
    the image installs onnxruntime-gpu from NVIDIA's Jetson index. A venv without it stops the agent wherever it
    runs ONNX Runtime (backend onnxruntime, or auto once an engine cannot be built)."""
    text = re.sub(r"(?m)^\s*#.*\n", "", JETSON_DOCKERFILE.read_text()).replace("\\\n", " ")
    args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", text))
    run_lines = [m.replace("${ORT_VERSION}", args["ORT_VERSION"]).replace("${ORT_INDEX_URL}", args["ORT_INDEX_URL"])
                 for m in re.findall(r"(?m)^RUN (.*)$", text)]
    image = pip_installs(run_lines)
    venv = pip_installs(doc_block("## Station without containers: systemd"))
    assert image and venv

    def wanted(install: list[str]) -> set[str]:
        """Packages and requirement files, with the index they come from (the --no-deps agent is '.')."""
        index = next((install[i + 1] for i, w in enumerate(install[:-1]) if w == "--index-url"), "pypi")
        reqs = {f"-r {Path(install[i + 1]).name}" for i, w in enumerate(install[:-1]) if w == "-r"}
        options = {w for i, w in enumerate(install) if w.startswith("-") or install[i - 1] in ("-r", "--index-url")}
        return reqs | {f"{w} from {index}" for w in install if w not in options and not w.startswith("-")}

    from_image = set().union(*map(wanted, image))
    from_docs = set().union(*map(wanted, venv))
    assert f"onnxruntime-gpu=={args['ORT_VERSION']} from {args['ORT_INDEX_URL']}" in from_image
    missing = from_image - from_docs
    assert not missing, f"{DOCS.name}, 'Station without containers': the venv lacks what {JETSON_DOCKERFILE.name} " \
                        f"installs: {sorted(missing)}"


# ---------------------------------------------------------------- bin/demo

STAND_IN = '''
"""Stands in for .venv/bin/python in a copy of bin/demo: the real training takes minutes. It logs every call;
`-m trainer demo` makes a bundle folder where --models-dir says and prints the export summary with the trainer's
own print_export_summary, so bin/demo reads the line the real trainer prints."""
import argparse, sys
from pathlib import Path
from types import SimpleNamespace

with open("calls.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:4] == ["-m", "trainer", "demo"]:
    p = argparse.ArgumentParser(prog="python -m trainer demo")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--fail", action="store_true")
    args = p.parse_args(sys.argv[4:])
    if args.fail:
        sys.exit("trainer demo: training failed")
    from trainer.cli import print_export_summary

    bundle = Path(args.models_dir) / "fashion-mnist" / "20261207T070000Z"
    bundle.mkdir(parents=True)
    int8 = {"val_accuracy": 0.9, "delta_top1_points": -0.2, "passed": True}
    quality = {"val_accuracy": 0.9, "val_macro_f1": 0.9, "int8": int8, "tensorrt": {"engines": 0, "reason": None},
               "parity": {"max_abs_logit_diff": 1e-5, "top1_agreement": 1.0}}
    print_export_summary(SimpleNamespace(bundle_dir=bundle, manifest={"quality": quality}))
'''


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """bin/demo, copied as it is, in a folder with last week's bundle in models/; bin/setup does nothing."""
    import sys

    (tmp_path / "bin").mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "models" / "fashion-mnist" / "20261130T080000Z").mkdir(parents=True)
    shutil.copy2(REPO / "bin" / "demo", tmp_path / "bin" / "demo")
    (tmp_path / "bin" / "setup").write_text("#!/usr/bin/env bash\nexit 0\n")
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    python = f"PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} stand_in.py"
    (tmp_path / ".venv" / "bin" / "python").write_text(f'#!/usr/bin/env bash\n{python} "$@"\n')
    for script in ("bin/demo", "bin/setup", ".venv/bin/python"):
        os.chmod(tmp_path / script, 0o755)
    proc = subprocess.run(["bash", "bin/demo", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = tmp_path / "calls.log"
    return proc, log.read_text().splitlines() if log.exists() else []


def test_bin_demo_verifies_and_runs_the_bundle_its_own_training_exported(tmp_path):
    """Not the newest folder under models/: with --models-dir elsewhere that is last week's bundle."""
    proc, calls = run_demo(tmp_path, "--models-dir", "elsewhere")
    assert proc.returncode == 0, proc.stderr
    made = "elsewhere/fashion-mnist/20261207T070000Z"
    assert calls == ["-m trainer demo --models-dir elsewhere", f"-m trainer verify {made}",
                     f"-m agent demo --bundle {made}"], calls


def test_bin_demo_help_prints_the_options_and_runs_nothing_else(tmp_path):
    proc, calls = run_demo(tmp_path, "--help")
    assert proc.returncode == 0 and "--models-dir" in proc.stdout, proc.stderr
    assert calls == ["-m trainer demo --help"]


def test_bin_demo_stops_with_the_trainers_error_when_training_fails(tmp_path):
    proc, calls = run_demo(tmp_path, "--fail")
    assert proc.returncode != 0 and "training failed" in proc.stderr
    assert calls == ["-m trainer demo --fail"]


# ---------------------------------------------------------------- station in a container: /etc/inventory-agent

def jetson_image_user() -> tuple[int, int]:
    user = re.search(r"(?m)^USER (\d+):(\d+)$", JETSON_DOCKERFILE.read_text())
    assert user, f"{JETSON_DOCKERFILE}: no numeric USER uid:gid"
    return int(user.group(1)), int(user.group(2))


def test_the_station_files_the_docs_install_validate_and_the_image_user_reads_the_password(tmp_path, open_dir):
    """The container section's commands, run with /etc/inventory-agent moved into a temp folder: the station.yaml
    and defaults.yaml they make pass `python -m agent validate-config`, and the password file they make is one the
    image's user (uid/gid 10001) can open (the start-up checks it and stops with exit 2 otherwise)."""
    import sys

    lines = doc_block("## Station in a container")
    etc = tmp_path / "etc-inventory-agent"
    config_lines = [line for line in lines if "firmware-config/" in line]
    assert config_lines, f"{DOCS.name}: Station in a container installs no firmware-config file"
    for line in ["install -d -m 0755 /etc/inventory-agent", *config_lines]:
        command = line.replace("sudo ", "").replace("/etc/inventory-agent", str(etc))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, f"{DOCS.name}: `{line}` failed: {proc.stderr}"
    proc = subprocess.run([sys.executable, "-m", "agent", "validate-config", str(etc / "station.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, \
        f"{DOCS.name}: the station.yaml it installs does not validate: {proc.stdout}{proc.stderr}"

    [password] = [line for line in lines if line.rstrip().split("<<<")[0].rstrip().endswith("/mqtt-password")]
    words = shlex.split(password.split("<<<")[0].replace("sudo ", ""))
    mode = int(words[words.index("-m") + 1], 8)
    group = int(words[words.index("-g") + 1]) if "-g" in words else 0
    owner = int(words[words.index("-o") + 1]) if "-o" in words and words[words.index("-o") + 1].isdigit() else 0
    secret = open_dir / "mqtt-password"
    secret.write_text("station-password\n")
    if os.geteuid() != 0:
        pytest.skip("needs root to give the password file the docs' owner and group")
    os.chown(secret, owner, group)
    os.chmod(secret, mode)
    uid, gid = jetson_image_user()
    assert readable_by(secret, uid, gid, []), f"{DOCS.name}: uid {uid} cannot read {password.split('<<<')[0]}"
    assert not mode & 0o007, f"{DOCS.name}: the password file is readable by every user (mode {mode:o})"
