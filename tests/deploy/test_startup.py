"""Start-up logic of the container/systemd entrypoint, outside any container.

Where a TensorRT engine is involved, ``FakeTensorRT`` stands for TensorRT's
builder (TensorRT cannot be installed on this machine) and ``ORIN`` for what
``probe_device()`` reads on a Jetson Orin.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import ORIN, REPO, FakeTensorRT

from agent.health import Metrics, PrometheusServer
from agent.startup import (
    ENV_ENGINE,
    ENV_ENGINE_CACHE_DIR,
    ENV_ENGINE_PRECISION,
    ENV_ENGINE_REQUEST,
    main,
)


def station_yaml(tmp_path: Path, bundle: Path, **model) -> Path:
    data = {"site": "ber1", "station": "receiving-01",
            "model": {"bundle": str(bundle), "backend": "onnxruntime", "batch_size": 4,
                      "download_dir": str(tmp_path / "state" / "bundles"), **model},
            "cameras": [{"id": "dock-a", "uri": "rtsp://10.20.1.11:554/stream1"}],
            "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")}}
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Exec:
    """Records the exec that would replace the start-up process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        self.calls.append((path, argv, env))


def start(config: Path, cache: Path, *extra: str, **inject) -> tuple[int, Exec]:
    exec_fn = Exec()
    rc = main(["start", "--config", str(config), "--engine-cache", str(cache), *extra], exec_fn=exec_fn, **inject)
    return rc, exec_fn


def test_a_valid_station_execs_the_agent_with_its_config(tmp_path, bundle_dir):
    config = station_yaml(tmp_path, bundle_dir)
    rc, exec_fn = start(config, tmp_path / "engines", "--", "--flush-timeout", "10", tensorrt_present=False)
    assert rc == 0
    [(path, argv, env)] = exec_fn.calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "agent", "run", "--config", str(config), "--flush-timeout", "10"]
    assert ENV_ENGINE not in env
    assert (tmp_path / "state").is_dir() and (tmp_path / "engines").is_dir()   # folders the agent writes exist


def test_backend_tensorrt_builds_on_first_start_and_reuses_on_restart(tmp_path, bundle_dir):
    config = station_yaml(tmp_path, bundle_dir, backend="tensorrt", prefer_int8=False)
    trt = FakeTensorRT()
    for _ in range(2):   # first start, then a restart of the container
        rc, exec_fn = start(config, tmp_path / "engines", device=ORIN, builder=trt)
        assert rc == 0
    assert trt.builds == 1 and trt.requests[0].key.max_batch == 4
    env = exec_fn.calls[0][2]
    assert env[ENV_ENGINE_PRECISION] == "fp16"
    assert Path(env[ENV_ENGINE]).parent.parent == tmp_path / "engines"
    assert json.loads(Path(env[ENV_ENGINE]).read_bytes())["engine-for"] == "model.fp32.onnx"


def test_the_agent_is_told_where_cmd_model_bundles_get_their_engines(tmp_path, bundle_dir):
    config = station_yaml(tmp_path, bundle_dir, backend="auto", prefer_int8=True)
    _, exec_fn = start(config, tmp_path / "engines", device=ORIN, builder=FakeTensorRT(), tensorrt_present=True)
    env = exec_fn.calls[0][2]
    assert env[ENV_ENGINE_CACHE_DIR] == str(tmp_path / "engines") and env[ENV_ENGINE_REQUEST] == "auto"
    # without TensorRT there is no cache to pass on, and a stale value from the parent does not leak through
    os.environ[ENV_ENGINE_CACHE_DIR] = "/stale"
    try:
        _, exec_fn = start(config, tmp_path / "engines", tensorrt_present=False)
    finally:
        del os.environ[ENV_ENGINE_CACHE_DIR]
    assert ENV_ENGINE_CACHE_DIR not in exec_fn.calls[0][2]


def test_a_bundle_from_cmd_model_gets_its_engine_from_the_same_cache(tmp_path, bundle_dir, caplog):
    """agent.app.EngineCachePolicy, as Agent.reload_model uses it before the swap (FakeTensorRT: no TensorRT here)."""
    from agent.app import DeviceEngine, EngineCachePolicy
    from agent.backends import BackendError
    from agent.config import load_config
    from agent.engine_cache import EngineCacheError, entries
    from contract.bundle import load_bundle

    auto = load_config(station_yaml(tmp_path, bundle_dir, backend="auto", prefer_int8=False))
    policy = EngineCachePolicy.from_env({ENV_ENGINE_CACHE_DIR: str(tmp_path / "engines"), ENV_ENGINE_REQUEST: "fp16"})
    bundle = load_bundle(bundle_dir)
    trt = FakeTensorRT()
    engine = policy.engine_for(auto, bundle, tensorrt_present=True, device=ORIN, builder=trt)
    assert isinstance(engine, DeviceEngine) and engine.precision == "fp16" and trt.builds == 1
    assert json.loads(engine.path.read_bytes())["engine-for"] == "model.fp32.onnx"
    again = policy.engine_for(auto, bundle, tensorrt_present=True, device=ORIN, builder=trt)
    assert again == engine and trt.builds == 1 and len(entries(tmp_path / "engines")) == 1   # cache hit
    # no TensorRT, or ONNX Runtime chosen: nothing is built
    assert policy.engine_for(auto, bundle, tensorrt_present=False, device=ORIN, builder=trt) is None
    ort = load_config(station_yaml(tmp_path, bundle_dir, backend="onnxruntime"))
    assert policy.engine_for(ort, bundle, tensorrt_present=True, device=ORIN, builder=trt) is None
    assert trt.builds == 1
    # a failed build: auto runs ONNX Runtime, tensorrt rejects the update (the old model keeps running)
    broken = FakeTensorRT(fail=EngineCacheError("model.fp32.onnx: TensorRT could not parse"))
    other = EngineCachePolicy(tmp_path / "other-cache", "fp16")
    assert other.engine_for(auto, bundle, tensorrt_present=True, device=ORIN, builder=broken) is None
    assert "it will run on ONNX Runtime" in caplog.text
    trt_cfg = load_config(station_yaml(tmp_path, bundle_dir, backend="tensorrt"))
    with pytest.raises(BackendError, match="model.backend tensorrt: .*could not parse"):
        other.engine_for(trt_cfg, bundle, tensorrt_present=True, device=ORIN, builder=broken)
    assert EngineCachePolicy.from_env({}) is None


def test_a_jetpack_upgrade_rebuilds_and_prunes_the_old_engine(tmp_path, bundle_dir):
    from agent.engine_cache import DeviceInfo, entries

    config = station_yaml(tmp_path, bundle_dir, backend="tensorrt")
    trt = FakeTensorRT()
    start(config, tmp_path / "engines", device=ORIN, builder=trt)
    start(config, tmp_path / "engines", device=DeviceInfo("10.4.0", "8.7"), builder=trt)
    assert trt.builds == 2
    assert [e["key"]["tensorrt_version"] for e in entries(tmp_path / "engines")] == ["10.4.0"]


def test_backend_tensorrt_without_tensorrt_cannot_start(tmp_path, bundle_dir, caplog):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; this test is for machines without it")
    config = station_yaml(tmp_path, bundle_dir, backend="tensorrt")
    rc, exec_fn = start(config, tmp_path / "engines")   # the real probe: no TensorRT here
    assert rc == 2 and exec_fn.calls == []
    assert "model.backend tensorrt: TensorRT is not installed" in caplog.text


@pytest.mark.parametrize("fail", ["parse", "cuda", "disk"])
def test_backend_auto_falls_back_to_onnxruntime_when_the_build_fails(tmp_path, bundle_dir, caplog, fail):
    """Whatever the build raises (the cache's own error, TensorRT's RuntimeError, a full disk): auto runs ONNX
    Runtime, at start and on cmd/model; tensorrt refuses."""
    from agent.app import EngineCachePolicy
    from agent.backends import BackendError
    from agent.config import load_config
    from agent.engine_cache import EngineCacheError
    from contract.bundle import load_bundle

    error = {"parse": EngineCacheError("model.int8.onnx: TensorRT could not parse"),
             "cuda": RuntimeError("[TRT] CUDA out of memory"),
             "disk": OSError(28, "No space left on device")}[fail]
    config = station_yaml(tmp_path, bundle_dir, backend="auto")
    rc, exec_fn = start(config, tmp_path / "engines", device=ORIN, tensorrt_present=True,
                        builder=FakeTensorRT(fail=error))
    assert rc == 0 and ENV_ENGINE not in exec_fn.calls[0][2]
    assert "will run ONNX Runtime" in caplog.text
    bundle = load_bundle(bundle_dir)
    policy = EngineCachePolicy(tmp_path / "update-cache", "fp16")
    auto = load_config(station_yaml(tmp_path, bundle_dir, backend="auto"))
    assert policy.engine_for(auto, bundle, tensorrt_present=True, device=ORIN,
                             builder=FakeTensorRT(fail=error)) is None
    with pytest.raises(BackendError, match="model.backend tensorrt: "):
        policy.engine_for(load_config(station_yaml(tmp_path, bundle_dir, backend="tensorrt")), bundle,
                          tensorrt_present=True, device=ORIN, builder=FakeTensorRT(fail=error))


def test_a_tampered_bundle_is_named(tmp_path, bundle_dir, caplog):
    (bundle_dir / "model.fp32.onnx").write_bytes(b"tampered!")
    rc, exec_fn = start(station_yaml(tmp_path, bundle_dir), tmp_path / "engines", tensorrt_present=False)
    assert rc == 2 and exec_fn.calls == []
    assert "field model.bundle:" in caplog.text and "model.fp32.onnx" in caplog.text


def test_an_outbox_folder_that_cannot_be_created_is_named(tmp_path, bundle_dir, caplog):
    config = station_yaml(tmp_path, bundle_dir)
    data = yaml.safe_load(config.read_text())
    (tmp_path / "a-file").write_text("")
    data["outbox"]["path"] = str(tmp_path / "a-file" / "outbox.sqlite")
    config.write_text(yaml.safe_dump(data))
    rc, _ = start(config, tmp_path / "engines", tensorrt_present=False)
    outbox = tmp_path / "a-file" / "outbox.sqlite"
    assert rc == 2 and f"{config}: field outbox.path: {outbox}: cannot create the folder" in caplog.text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.startup", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli_bad_config_exits_2_naming_file_and_field(tmp_path, bundle_dir):
    config = station_yaml(tmp_path, bundle_dir)
    config.write_text(config.read_text().replace("batch_size: 4", "batch_size: 0"))
    proc = run_cli("start", "--engine-cache", str(tmp_path / "e"), env={"INVENTORY_AGENT_CONFIG": str(config)})
    assert proc.returncode == 2
    assert f"{config}: field model.batch_size: Input should be greater than or equal to 1" in proc.stderr


def test_cli_really_execs_the_agent_cli(tmp_path, bundle_dir):
    # exec into `python -m agent run --config ... --help`: the agent's own parser answers, so the
    # process image was replaced by the agent with the arguments the start-up built
    config = station_yaml(tmp_path, bundle_dir)
    proc = run_cli("start", "--config", str(config), "--engine-cache", str(tmp_path / "e"), "--", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m agent run" in proc.stdout and "--exit-at-end" in proc.stdout


def test_healthcheck_passes_while_the_agent_serves_metrics_and_fails_when_not(tmp_path):
    metrics = Metrics()
    metrics.info.update(model_name="demo", model_version="v1")
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert main(["healthcheck", "--url", url]) == 0
        assert main(["healthcheck", "--url", f"http://127.0.0.1:{server.port}/nothing"]) == 1
    finally:
        server.stop()
    assert main(["healthcheck", "--url", url, "--timeout", "1"]) == 1


def test_a_missing_broker_secret_or_public_key_stops_the_start_before_any_engine_is_built(tmp_path, bundle_dir,
                                                                                         caplog):
    """The MQTT password file was checked only by the agent itself, after start-up had built a TensorRT engine
    (minutes); a missing public key was reported under model.bundle."""
    config = station_yaml(tmp_path, bundle_dir)
    data = yaml.safe_load(config.read_text())
    data["mqtt"] = {"host": "broker.local", "password_file": str(tmp_path / "no-such-password")}
    config.write_text(yaml.safe_dump(data))
    trt = FakeTensorRT()
    rc, exec_fn = start(config, tmp_path / "engines", device=ORIN, tensorrt_present=True, builder=trt)
    assert rc == 2 and exec_fn.calls == [] and trt.builds == 0
    assert "mqtt.password_file" in caplog.text and "no-such-password" in caplog.text
    del data["mqtt"]
    data["model"]["public_key"] = str(tmp_path / "missing.pub")
    config.write_text(yaml.safe_dump(data))
    caplog.clear()
    rc, _ = start(config, tmp_path / "engines", tensorrt_present=False)
    assert rc == 2 and "field model.public_key" in caplog.text and "missing.pub" in caplog.text


def test_a_shipped_engine_is_never_taken_for_a_batch_larger_than_its_profile(tmp_path):
    from deploy_support import make_bundle

    from agent.engine_cache import SHIPPED_MAX_BATCH, bundle_engine, engine_key
    from contract.bundle import load_bundle

    bundle = load_bundle(make_bundle(tmp_path / "m", engines=[{"precision": "fp16", "tensorrt_version": "10.3.0",
                                                                "compute_capability": "8.7"}]))
    assert bundle_engine(bundle, engine_key(bundle, ORIN, "fp16", SHIPPED_MAX_BATCH)) is not None
    assert bundle_engine(bundle, engine_key(bundle, ORIN, "fp16", SHIPPED_MAX_BATCH + 1)) is None
