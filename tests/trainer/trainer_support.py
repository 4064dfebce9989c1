"""What several trainer tests watch: the images waiting in memory for a model (the export, the evaluation and the
enrolment stream their images) and the calls that put a file on disk for good (fsync, rename)."""

from __future__ import annotations

import os
import struct
import zipfile

import onnxruntime as ort

from contract.preprocess import Preprocessor


def count_waiting_images(monkeypatch, *, torch_models: bool = False) -> dict[str, int]:
    """Counts the images preprocessed (each goes through the station's Preprocessor) since a model last ran a batch
    (an ONNX Runtime run; with ``torch_models`` also a forward of a checkpoint's torch model): ``peak`` is the most
    that ever waited, ``total`` all of them. Only images made in this process are counted (workers=0)."""
    made = {"since_run": 0, "peak": 0, "total": 0}
    preprocess, run_batch = Preprocessor.__call__, ort.InferenceSession.run

    def counted_preprocess(self, rgb):
        made["since_run"] += 1
        made["total"] += 1
        made["peak"] = max(made["peak"], made["since_run"])
        return preprocess(self, rgb)

    def ran(*_):
        made["since_run"] = 0

    def counted_run(self, *args, **kwargs):
        ran()
        return run_batch(self, *args, **kwargs)

    monkeypatch.setattr(Preprocessor, "__call__", counted_preprocess)
    monkeypatch.setattr(ort.InferenceSession, "run", counted_run)
    if torch_models:
        import trainer.engine as engine

        load = engine.load_checkpoint_model

        def counted_load(*args, **kwargs):
            model, ckpt = load(*args, **kwargs)
            model.register_forward_pre_hook(ran)
            return model, ckpt

        monkeypatch.setattr(engine, "load_checkpoint_model", counted_load)
    return made


def trace_fsync_and_replace(monkeypatch) -> list[tuple]:
    """The calls of ``os.fsync`` (path and, for a file, its size then) and ``os.replace`` (source, target) from now
    on, in order: a write made durable is the whole file fsynced, renamed, then its folder fsynced. A power cut
    cannot be simulated here, so the tests check these calls."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def traced_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, os.fstat(fd).st_size if os.path.isfile(path) else None))
        return real_fsync(fd)

    def traced_replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", traced_replace)
    return events


def flip_bytes_in_largest_record(path) -> str:
    """Inverts 64 bytes inside the data of the checkpoint's largest record (a tensor), as a disk error would."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    path.write_bytes(bytes(raw))
    return record.filename
