"""Shared fixtures: real Fashion-MNIST product images and a real bundle exported by the trainer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/*/test_hostile_*.py): the same examples on every run (derandomize), no per-example
# deadline (the suite must pass while another process keeps a core busy), and no example database
# written into the checkout. HYPOTHESIS_PROFILE=explore searches fresh random examples, many more of them.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ONNX Runtime's telemetry sends events through an https_proxy set in the environment: a test whose proxy counts
# the CONNECTs it gets (tests/agent/test_update_dns.py) saw one to mobile.events.data.microsoft.com whenever a
# session had been made earlier in the same process. Tests make no connection they do not name.
try:
    import onnxruntime

    onnxruntime.disable_telemetry_events()
except ImportError:      # where ONNX Runtime is not installed there is no telemetry to turn off
    pass

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _require_fashion_mnist() -> None:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """The first 1,000 train and 1,000 test Fashion-MNIST images as PNG class folders."""
    _require_fashion_mnist()
    from trainer.data import import_fashion_mnist

    out = tmp_path_factory.mktemp("fashion-mnist")
    import_fashion_mnist(out, FMNIST, limit=1000)
    return out


@pytest.fixture(scope="session")
def trained_run(fmnist_dir, tmp_path_factory) -> Path:
    """A short real fine-tune of ImageNet MobileNetV2 on real images (32 px); the run folder."""
    from trainer.config import TrainConfig
    from trainer.engine import Trainer

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(data=str(fmnist_dir / "train"), name="tiny", arch="mobilenet_v2", weights="imagenet",
                      image_size=32, resize_shorter=32, epochs=2, batch_size=32, lr=1e-3, val_fraction=0.2,
                      workers=0, seed=0)
    Trainer(cfg, run_dir).fit()
    return run_dir


@pytest.fixture(scope="session")
def real_bundle(trained_run, tmp_path_factory) -> Path:
    """A bundle exported by the real trainer (ONNX FP32 + INT8 QDQ) from ``trained_run``."""
    from trainer.export.bundle import ExportConfig, export_bundle
    from trainer.export.quantize import QuantizeConfig

    models = tmp_path_factory.mktemp("models")
    result = export_bundle(ExportConfig(checkpoint=trained_run / "best.pt", models_dir=models, name="fashion-mnist",
                                        version="1", quantize=QuantizeConfig(calibration_images=128),
                                        tensorrt="off", workers=0))
    return result.bundle_dir


@pytest.fixture
def metrics_server():
    """A station's real /metrics server (agent.health) on a free local port, with a model named; its base URL."""
    from agent.health import Metrics, PrometheusServer

    metrics = Metrics()
    metrics.info.update(model_name="demo", model_version="v1")
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
