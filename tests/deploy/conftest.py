"""Deployment fixtures; the helpers live in deploy_support.py (importable by the tests under a unique name)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from deploy_support import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    CentralBroker,
    Pki,
    Probe,
    make_bundle,
    make_pki,
    make_probe,
)


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return make_bundle(tmp_path / "models")


@pytest.fixture
def mosquitto_bin() -> str:
    if not Path(MOSQUITTO).exists() or not Path(MOSQUITTO_PASSWD).exists():
        pytest.skip("mosquitto/mosquitto_passwd not installed (apt-get install mosquitto mosquitto-clients)")
    return MOSQUITTO


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def central_broker(mosquitto_bin, pki, tmp_path) -> Iterator[CentralBroker]:
    workdir = tmp_path / "central"
    workdir.mkdir()
    broker = CentralBroker(workdir, pki).start()
    yield broker
    broker.stop()


@pytest.fixture
def connect(central_broker):
    probes: list[Probe] = []

    def _connect(user: str | None, **kw) -> Probe:
        kw.setdefault("ca", str(central_broker.pki.ca_cert))
        port = kw.pop("port", central_broker.tls_port)
        probe = make_probe(port, user, **kw)
        probes.append(probe)
        return probe

    yield _connect
    for p in probes:
        p.close()
