"""Fixtures shared by tests/central/dashboard and tests/browser (each conftest imports them by name)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_support import broker, make_tiny_bundle, mosquitto_bin  # noqa: F401 (re-exported)
from dashboard_support import Recorded, fmnist_video, record_agent_session

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """Two versions of a small random-weight bundle (agent_support.make_tiny_bundle): tiny-1 runs, tiny-2 is the update."""
    pytest.importorskip("torch", reason="the test bundle is exported with torch (trainer extra)")
    root = tmp_path_factory.mktemp("dash-models")
    make_tiny_bundle(root, "tiny-1")
    make_tiny_bundle(root, "tiny-2")
    return root / "tiny"


@pytest.fixture(scope="session")
def tiny_bundle(models) -> Path:
    return models / "tiny-1"


@pytest.fixture(scope="session")
def video(tmp_path_factory) -> Path:
    if not FASHION_MNIST.exists():
        pytest.skip("Fashion-MNIST is not installed in /usr/share/datasets/fashion-mnist")
    return fmnist_video(tmp_path_factory.mktemp("dash-video") / "fmnist12.avi")


@pytest.fixture(scope="session")
def recorded(mosquitto_bin, tiny_bundle, video, tmp_path_factory) -> list[Recorded]:  # noqa: F811 (the imported fixture)
    """What the real agent sent over a real broker: statuses (online, a rejected update, offline), results,
    decisions, QC alerts and stats, in arrival order."""
    return record_agent_session(tmp_path_factory.mktemp("dash-record"), tiny_bundle, video)
