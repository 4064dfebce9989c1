"""Secrets from files (MQTT passwords, the review page's token): the first line, or an error naming the file."""

from __future__ import annotations

import pytest

from contract.secrets import SecretFileError, first_line


def test_the_first_line_is_the_secret(tmp_path):
    (tmp_path / "pw").write_text("s3cret\nignored comment\n")
    assert first_line(tmp_path / "pw") == "s3cret"


@pytest.mark.parametrize("content", [None, "", "\nsecond line\n"])
def test_a_missing_or_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "pw"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SecretFileError) as err:
        first_line(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    reason = message[len(f"{path}: "):]
    assert reason == ("the first line (the secret) is empty" if content is not None else "No such file or directory")


def test_a_secret_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "pw").write_bytes(b"\xffsecret\n")
    with pytest.raises(SecretFileError, match=f"{tmp_path / 'pw'}: not UTF-8 text"):
        first_line(tmp_path / "pw")


def test_each_tool_names_its_own_option(tmp_path):
    from central.review.ingest import read_secret

    with pytest.raises(SystemExit, match=r"^--token-file: .*token: No such file"):
        read_secret(tmp_path / "token", "--token-file")
    with pytest.raises(SystemExit, match=r"^--password-file: .*empty"):
        (tmp_path / "pw").write_text("")
        read_secret(tmp_path / "pw")
    assert read_secret(None) is None
