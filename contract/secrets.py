"""Secrets read from files: the first line is the secret (a password or a token), never a config value."""

from __future__ import annotations

from pathlib import Path

SECRET_MAX_BYTES = 4096     # a password or a token; more is not a secret file (and is not read into memory)


class SecretFileError(ValueError):
    """A secret file that cannot be read or whose first line is empty; the message names the file."""


def first_line(path: str | Path) -> str:
    """The first line of ``path`` (a UTF-8 byte order mark, as some editors write, is not part of it); raises
    SecretFileError naming the file when it is unreadable, not a regular file (a FIFO would block the read
    forever), larger than ``SECRET_MAX_BYTES`` or empty."""
    from contract.bundle import BundleError, read_small_file  # numpy and OpenCV: only once a secret is read

    try:
        data = read_small_file(Path(path), SECRET_MAX_BYTES, "a secret file")
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror or exc}") from None
    except BundleError as exc:      # names the file already: "<path>: not a regular file" / "...: more than ..."
        raise SecretFileError(str(exc)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path}: not UTF-8 text (a secret file holds the secret on its first line)") from None
    line = next(iter(text.splitlines()), "")
    if not line:
        raise SecretFileError(f"{path}: the first line (the secret) is empty")
    return line
