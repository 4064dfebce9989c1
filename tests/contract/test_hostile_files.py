"""Hostile small files the contract reads: gate records (contract.events) and secret files (contract.secrets).
Whatever they hold, reading them is the module's own error naming the file, never a bare exception, a hang
or a value (NaN, a byte order mark) that is not what the file means.

Real parts: files, FIFOs and links on disk.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from contract.events import GATE_FILE, GATE_LOG, RolloutError, read_gate, rejected_in_log, write_gate
from contract.secrets import SECRET_MAX_BYTES, SecretFileError, first_line

SHA = "a" * 64


def _bundle_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model" / "2"
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------- gate.json

@pytest.mark.parametrize("data, reason", [
    (b'\xff{"decision": "promoted"}', r"not UTF-8 \(byte 0"),
    (b'{"decision": "promoted", "reason": "\xed\xa0\x80"}', r"not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON .*nested deeper"),
    (b'{"decision": "promoted", "manifest_sha256": "x", "figures": {"top1": NaN}}', "not valid JSON .*NaN"),
    (b'{"decision": "promoted", "figures": {"top1": 1e999}}', "not valid JSON .*finite"),
    (b'{"decision": "promoted"', "not valid JSON"),
    (b'{"decision": "maybe"}', "field decision: expected promoted, rejected or baseline"),
])
def test_a_gate_record_that_is_not_finite_utf8_json_is_a_rollout_error_naming_the_file(tmp_path, data, reason):
    folder = _bundle_dir(tmp_path)
    (folder / GATE_FILE).write_bytes(data)
    with pytest.raises(RolloutError, match=f"^{folder / GATE_FILE}: {reason}"):
        read_gate(folder)


def test_a_gate_record_that_is_a_folder_is_a_rollout_error_naming_it(tmp_path):
    folder = _bundle_dir(tmp_path)
    (folder / GATE_FILE).mkdir()
    with pytest.raises(RolloutError, match=f"^{folder / GATE_FILE}: cannot read"):
        read_gate(folder)


def test_a_written_gate_record_reads_back(tmp_path):
    folder = _bundle_dir(tmp_path)
    (folder / "manifest.json").write_text("{}")
    assert read_gate(folder) is None
    record = {"decision": "rejected", "manifest_sha256": SHA, "reason": "worse", "figures": {"top1": 0.5}}
    write_gate(folder, record)
    assert read_gate(folder) == record
    assert rejected_in_log(folder, SHA) == record


# ---------------------------------------------------------------- gate-log.jsonl

@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"decision": "promoted", "manifest_sha256": "' + SHA.encode() + b'", "figures": {"top1": NaN}}',
    b"\xff\xfe not a record",
])
def test_a_gate_log_line_that_is_no_record_is_passed_over(tmp_path, line):
    """A line that does not parse (nested past the parser's depth, NaN, bytes that are not UTF-8) is treated as
    a torn one: skipped, unless it names this manifest as rejected; the records after it still count."""
    folder = _bundle_dir(tmp_path)
    (folder.parent / GATE_LOG).write_bytes(line + b"\n")
    assert rejected_in_log(folder, SHA) is None
    rejection = {"decision": "rejected", "manifest_sha256": SHA, "reason": "worse"}
    with open(folder.parent / GATE_LOG, "ab") as fh:
        fh.write(json.dumps(rejection).encode() + b"\n")
    assert rejected_in_log(folder, SHA) == rejection


def test_a_gate_log_line_with_nan_that_names_this_manifest_rejected_still_counts(tmp_path):
    folder = _bundle_dir(tmp_path)
    (folder.parent / GATE_LOG).write_bytes(
        b'{"decision": "rejected", "manifest_sha256": "' + SHA.encode() + b'", "figures": {"top1": NaN}}\n')
    found = rejected_in_log(folder, SHA)
    assert found is not None and found["decision"] == "rejected" and f"{GATE_LOG}:1" in found["reason"]


# ---------------------------------------------------------------- secret files

def test_a_byte_order_mark_is_not_part_of_the_secret(tmp_path):
    """Notepad and some editors start a UTF-8 file with a byte order mark; the broker would get it as the first
    character of the password."""
    (tmp_path / "pw").write_bytes("\ufeffs3cret\nignored\n".encode("utf-8"))
    assert first_line(tmp_path / "pw") == "s3cret"
    (tmp_path / "pw").write_bytes("\ufeff\ns3cret\n".encode("utf-8"))
    with pytest.raises(SecretFileError, match=f"^{tmp_path / 'pw'}: the first line \\(the secret\\) is empty"):
        first_line(tmp_path / "pw")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_secret_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """A FIFO blocked the read until a writer came (a hung start); /dev/zero never ends."""
    path = tmp_path / "pw"
    {"fifo": lambda: os.mkfifo(path), "dev-zero": lambda: path.symlink_to("/dev/zero"),
     "folder": path.mkdir}[kind]()
    outcome: list[BaseException | str] = []

    def read() -> None:
        try:
            outcome.append(first_line(path))
        except BaseException as exc:  # noqa: BLE001 (what the reading thread ended with is the test's subject)
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5.0)
    if reader.is_alive():           # unblock the reader before failing, so the test run does not hang
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"x\n")
        os.close(fd)
        pytest.fail(f"first_line({kind}) still blocked after 5 s")
    assert len(outcome) == 1 and isinstance(outcome[0], SecretFileError), outcome
    assert str(outcome[0]).startswith(f"{path}: ")


def test_a_secret_file_larger_than_a_secret_is_refused_naming_it(tmp_path):
    (tmp_path / "pw").write_bytes(b"s3cret\n" + b"x" * SECRET_MAX_BYTES)
    with pytest.raises(SecretFileError, match=f"^{tmp_path / 'pw'}: more than a secret file's {SECRET_MAX_BYTES}"):
        first_line(tmp_path / "pw")
    (tmp_path / "pw").write_bytes(b"s3cret\n" + b"x" * (SECRET_MAX_BYTES - 7))
    assert first_line(tmp_path / "pw") == "s3cret"
