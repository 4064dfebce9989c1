"""``--group FILE`` is read and checked before the rollout or rollback connects to the broker.

It was read after the connect: a missing file or a line that is no station name was found only once the broker
had been reached, and with no broker answering the error was the broker's ("no CONNACK within 15 s"), never the
file's. /tmp/review-followups/repro_group.py."""

from __future__ import annotations

import re
import socket
import threading

import pytest
from rollout_support import cli, promote, tiny_versions

from central.rollout.stations import read_group
from contract.events import RolloutError


@pytest.fixture
def listener():
    """A TCP port that counts the connections made to it (and closes each): where the broker would be."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    sock.close()
    thread.join(5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tiny_versions(tmp_path_factory.mktemp("models"), ["v2"])["v2"]
    promote(folder)
    return folder


@pytest.mark.parametrize("verb", ["rollout", "rollback"])
@pytest.mark.parametrize("content, expected", [
    (None, r"missing\.txt: cannot read the station group \(No such file or directory\)"),
    ("s/a\n# a comment\nber1/st.a  # a dot\n", r"bad\.txt:3: expected <site>/<station> .*got 'ber1/st\.a'"),
    ("# nobody yet\n\n", r"empty\.txt: lists no stations"),
])
def test_a_bad_group_file_is_refused_naming_file_and_line_before_any_connection(verb, content, expected, listener,
                                                                                 bundle, tmp_path):
    port, accepted = listener
    name = {None: "missing", "# nobody yet\n\n": "empty"}.get(content, "bad")
    group = tmp_path / f"{name}.txt"
    if content is not None:
        group.write_text(content)
    extra = ["--bundle-url", str(bundle), "--no-canary"] if verb == "rollout" else []
    done = cli(verb, "--group", str(group), *extra, "--history", str(tmp_path / "h.json"),
               "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port), timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(expected, done.stderr), done.stderr
    assert accepted == [], "the broker was connected to before the group file was read"


def test_read_group_lists_the_stations_past_comments_blank_lines_and_a_byte_order_mark(tmp_path):
    group = tmp_path / "group.txt"
    group.write_bytes("\ufeffs/a\n\n  s/b  # the second\n# s/c\n".encode("utf-8"))
    assert read_group(group) == ["s/a", "s/b"]
    group.write_bytes(b"s/a\n\xff\n")
    with pytest.raises(RolloutError, match=r"group\.txt: cannot read the station group"):
        read_group(group)
