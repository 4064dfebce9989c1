"""Agent fixtures: a real mosquitto per test, real Fashion-MNIST videos, small and real bundles.

Helpers live in agent_support.py (tests import them from there, never from conftest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from agent_support import broker, make_tiny_bundle, mosquitto_bin  # noqa: F401

from agent.demo import FASHION_MNIST_DIR, fashion_mnist_test, write_video


@pytest.fixture(scope="session")
def fmnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed in /usr/share/datasets/fashion-mnist")
    return fashion_mnist_test(n=200)


@pytest.fixture(scope="session")
def fmnist_video(fmnist_test_images, tmp_path_factory) -> Path:
    """60 real Fashion-MNIST test images, one video frame each, MJPG .avi."""
    path = tmp_path_factory.mktemp("video") / "fmnist60.avi"
    write_video(fmnist_test_images[0][:60], path, size=64)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-models"))
