"""The one TensorRT build (``agent.engine_cache.serialize_engine``) behind both callers: the station's engine cache
and ``trainer export``. TensorRT cannot be installed here (its wheels come from a host this machine cannot reach),
so a stand-in module written after TensorRT 10's Python API records what each caller asks of it; the real build
runs on a Jetson or GPU host (tests/trainer/test_export.py ``test_tensorrt_engines_build_where_present``)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from agent import engine_cache
from agent.engine_cache import BuildRequest, EngineCacheError, EngineKey
from contract.preprocess import InputSpec
from trainer.export import tensorrt as trt_export


class StandInTensorRT(types.ModuleType):
    """Records the network flags, builder flags, workspace and optimization profile of each build."""

    def __init__(self, parses: bool = True, builds: bool = True) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.3.0"
        self.calls: list[dict] = []
        rec = self.calls

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Input:
            name = "images"

        class Network:
            def get_input(self, i):
                return Input()

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec[-1]["profile"] = (name, lo, opt, hi)

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec[-1]["workspace"] = size

            def set_flag(self, flag):
                rec[-1].setdefault("flags", []).append(flag)

            def add_optimization_profile(self, profile):
                rec[-1]["profiles"] = rec[-1].get("profiles", 0) + 1

        class Builder:
            def __init__(self, logger):
                rec.append({})

            def create_network(self, flags):
                rec[-1]["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan" if builds else None

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec[-1]["onnx"] = path
                return parses

            def get_error(self, i):
                return "unsupported node"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)


@pytest.fixture
def trt(monkeypatch):
    fake = StandInTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "compute_capability", lambda: "8.7")
    return fake


def test_the_station_and_the_exporter_build_an_int8_engine_the_same_way(trt, tmp_path):
    onnx = tmp_path / "model.int8.onnx"
    request = BuildRequest(onnx, EngineKey("abc", "10.3.0", "8.7", "int8", 16), InputSpec(48, 48, 48))
    assert engine_cache.build_with_tensorrt(request) == b"plan"
    built = trt_export.build_engine(onnx, tmp_path, trt_export.EngineSpec("int8", 48, 48, max_batch=16, opt_batch=8))
    station, export = trt.calls
    assert station == export == {"network_flags": 0, "onnx": str(onnx), "workspace": 1024 << 20,
                                 "flags": ["fp16", "int8"], "profile": ("images", (1, 3, 48, 48), (8, 3, 48, 48),
                                                                        (16, 3, 48, 48)), "profiles": 1}
    assert built["path"].read_bytes() == b"plan" and built["path"].name == "model.int8.sm87.trt10.3.0.engine"


def test_an_fp16_engine_sets_no_int8_flag(trt, tmp_path):
    trt_export.build_engine(tmp_path / "model.fp32.onnx", tmp_path, trt_export.EngineSpec("fp16", 32, 32))
    assert trt.calls[0]["flags"] == ["fp16"]


@pytest.mark.parametrize("parses, builds, message", [(False, True, "could not parse the model: unsupported node"),
                                                     (True, False, "failed to build a int8 engine")])
def test_a_model_tensorrt_cannot_take_is_named_by_each_callers_error(monkeypatch, tmp_path, parses, builds, message):
    monkeypatch.setitem(sys.modules, "tensorrt", StandInTensorRT(parses, builds))
    monkeypatch.setattr(trt_export, "compute_capability", lambda: "8.7")
    onnx = tmp_path / "model.int8.onnx"
    with pytest.raises(EngineCacheError, match=message) as station:
        engine_cache.build_with_tensorrt(BuildRequest(onnx, EngineKey("abc", "10.3.0", "8.7", "int8", 8),
                                                      InputSpec(32, 32, 32)))
    with pytest.raises(RuntimeError, match=message) as export:
        trt_export.build_engine(onnx, tmp_path, trt_export.EngineSpec("int8", 32, 32))
    assert str(onnx) in str(station.value) and str(onnx) in str(export.value)
    assert not list(Path(tmp_path).glob("*.engine"))
