"""deploy/central/compose.yaml: parsed by a Compose-spec parser (compose-spec, the Rust compose_spec crate)
and checked against the broker config it mounts. No Docker engine runs here, so `docker compose config`
cannot; the parser rejects unknown keys and wrong types the same way."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import REPO, SHIPPED_CONF

COMPOSE = REPO / "deploy" / "central" / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mount(volume: str | dict) -> tuple[str, str]:
    """(source, target) of a service volume in the short (``src:dst[:ro]``) or the long (mapping) syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def parse(text: str):
    compose_spec = pytest.importorskip("compose_spec", reason="pip install -e '.[test]' brings compose-spec")
    return compose_spec.PyCompose.from_yaml(text)


def test_the_compose_spec_parser_accepts_it():
    parsed = parse(COMPOSE.read_text())
    parsed.validate()
    assert parsed.service_names() == ["mosquitto", "ingest", "review", "bundle-server", "dashboard"]


def test_the_parser_is_strict_enough_to_catch_a_typo():
    with pytest.raises(ValueError, match="restrat"):
        parse(COMPOSE.read_text().replace("restart: unless-stopped", "restrat: unless-stopped", 1))


def test_every_reference_is_declared(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = mount(vol)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{COMPOSE}: services.{name}.volumes: {source} not declared"
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], f"{COMPOSE}: services.{name}.secrets: {secret} not declared"
        for net in svc.get("networks", []):
            assert net in compose["networks"], f"{COMPOSE}: services.{name}.networks: {net} not declared"


def test_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"services.{name}.image: {image}"


def test_the_broker_runs_the_shipped_config_and_publishes_only_its_tls_listeners(compose):
    broker = compose["services"]["mosquitto"]
    mounts = {target: source for source, target in map(mount, broker["volumes"])}
    assert (COMPOSE.parent / mounts["/mosquitto/config/mosquitto.conf"]).resolve() == SHIPPED_CONF
    assert (COMPOSE.parent / mounts["/mosquitto/config/acl"]).resolve() == SHIPPED_CONF.parent / "acl"
    for path in re.findall(r"^(?:password_file|acl_file|cafile|certfile|keyfile) (\S+)", SHIPPED_CONF.read_text(), re.M):
        assert any(path.startswith(target) for target in mounts), f"{SHIPPED_CONF}: {path} is not mounted"
    listeners = set(re.findall(r"^listener (\d+)", SHIPPED_CONF.read_text(), re.M))
    published = {p.split(":")[-1] for p in broker["ports"]}
    assert published == listeners == {"8883", "8884"}                 # no plain 1883 anywhere
    assert broker["ulimits"]["nofile"]["soft"] >= 10000                # thousands of station sockets


def test_every_central_service_runs_the_central_image_with_a_command_it_parses(compose):
    """One image, built from deploy/central/Dockerfile; each command is what ``python -m central`` (the image's
    entrypoint) accepts, and the pages are served over HTTPS behind a token or a password."""
    from central.cli import get_args_parser

    built = compose["services"]["ingest"]["build"]
    assert (COMPOSE.parent / built["context"] / built["dockerfile"]).resolve() == COMPOSE.parent / "Dockerfile"
    parser = get_args_parser()
    seen = {}
    for name in ("ingest", "review", "bundle-server", "dashboard"):
        svc = compose["services"][name]
        assert svc["image"] == compose["services"]["ingest"]["image"] and "profiles" not in svc, name
        seen[name] = parser.parse_args(svc["command"])
    assert seen["review"].token_file and seen["review"].tls_cert and seen["review"].tls_key
    assert seen["bundle-server"].tls_cert and seen["bundle-server"].tls_key
    assert seen["dashboard"].web_password_file and seen["dashboard"].web_tls_cert and seen["dashboard"].tls_ca
    assert seen["ingest"].tls_ca and seen["ingest"].password_file
