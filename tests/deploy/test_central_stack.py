"""The central stack without Docker: every service of deploy/central/compose.yaml started from its own command,
through the central image's entrypoint (deploy/central/Dockerfile: ``python -m central``), against mosquitto
running the shipped broker config (TLS only, passwords, ACL).

Only the container paths, the broker's host name and the ports are moved into the test's folder; the flags are
the compose file's. Checked: ingest subscribes as ``central-ingest`` over TLS; the review API answers over
HTTPS only with its token; the bundle server serves published files over HTTPS and nothing else; the dashboard
page asks for its password over HTTPS and reads the broker as user ``dashboard``.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_support import REPO, USERS, free_port

pytestmark = pytest.mark.mqtt

COMPOSE = REPO / "deploy" / "central" / "compose.yaml"
DOCKERFILE = REPO / "deploy" / "central" / "Dockerfile"
WEB_PASSWORD = "web-pw-viewer"
TOKEN = "review-t0ken"


def entrypoint() -> list[str]:
    [line] = [m for m in re.findall(r"(?m)^ENTRYPOINT\s+(.*)$", DOCKERFILE.read_text())]
    command = json.loads(line)
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def remap(command: list[str], mapping: dict[str, str]) -> list[str]:
    return [mapping.get(arg, arg) for arg in command]


def wait_for(check, timeout: float, what: str, procs: dict[str, subprocess.Popen], logs: Path):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited:\n{(logs / f'{name}.log').read_text()[-3000:]}"
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what} ({last})")


def fetch(url: str, ca: Path, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_every_compose_service_runs_from_the_image_entrypoint_with_tls_and_auth(central_broker, pki, tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in (("central_ingest_password", USERS["central-ingest"]),
                        ("dashboard_password", USERS["dashboard"]),
                        ("dashboard_web_password", WEB_PASSWORD), ("review_token", TOKEN)):
        (secrets / name).write_text(value + "\n")
    store, published = tmp_path / "review-data", tmp_path / "published"
    (published / "tiny" / "v1").mkdir(parents=True)
    (published / "tiny" / "v1" / "manifest.json").write_text('{"name": "tiny"}')
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["Bag", "Sneaker"]))
    ports = {"8080": str(free_port()), "8443": str(free_port()), "8090": str(free_port()),
             "8883": str(central_broker.tls_port)}
    mapping = {"mosquitto": "127.0.0.1", "0.0.0.0": "127.0.0.1", **ports,
               "/certs/ca.crt": str(pki.ca_cert), "/certs/server.crt": str(pki.server_cert),
               "/certs/server.key": str(pki.server_key), "/var/lib/inventory-review": str(store),
               "/etc/inventory/labels.json": str(labels), "/srv/bundles": str(published),
               **{f"/run/secrets/{p.name}": str(p) for p in secrets.iterdir()}}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("ingest", "review", "bundle-server", "dashboard"):
            command = remap(services[name]["command"], mapping)
            assert not [a for a in command if a.startswith(("/certs", "/run/secrets", "/var/lib", "/srv", "/etc"))]
            with open(tmp_path / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen([*entrypoint(), *command], cwd=REPO, stdout=log,
                                               stderr=subprocess.STDOUT)
        log_of = lambda name: (tmp_path / f"{name}.log").read_text()      # noqa: E731
        wait_for(lambda: "subscribed to" in log_of("ingest"), 60, "ingest to subscribe", procs, tmp_path)

        review = f"https://localhost:{ports['8080']}/"
        status, _ = wait_for(lambda: fetch(review + "api/stats", pki.ca_cert), 60, "the review API", procs, tmp_path)
        assert status == 401
        status, body = fetch(review + "api/stats", pki.ca_cert, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["frames"] == 0
        assert fetch(review, pki.ca_cert)[0] == 200                      # the page itself; it asks for the token

        bundles = f"https://localhost:{ports['8443']}/"
        status, body = wait_for(lambda: fetch(bundles + "tiny/v1/manifest.json", pki.ca_cert), 60, "the bundle server",
                                procs, tmp_path)
        assert status == 200 and json.loads(body) == {"name": "tiny"}
        assert fetch(bundles + "tiny/", pki.ca_cert)[0] == 404             # no listings

        dashboard = f"https://localhost:{ports['8090']}/"
        status, _ = wait_for(lambda: fetch(dashboard, pki.ca_cert), 60, "the dashboard", procs, tmp_path)
        assert status == 401
        viewer = {"Authorization": "Basic " + base64.b64encode(f"viewer:{WEB_PASSWORD}".encode()).decode()}
        assert fetch(dashboard, pki.ca_cert, {"Authorization": "Basic " + base64.b64encode(b"viewer:no").decode()})[0] == 401
        status, page = fetch(dashboard, pki.ca_cert, viewer)
        assert status == 200 and b'id="stations"' in page
        wait_for(lambda: json.loads(fetch(dashboard + "healthz", pki.ca_cert)[1])["broker_connected"], 60,
                 "the dashboard to reach the broker as user dashboard", procs, tmp_path)
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited:\n{log_of(name)[-3000:]}"
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
