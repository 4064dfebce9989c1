"""Secrets read from files: the first line is the secret (a password or a token), never a config value."""

from __future__ import annotations

from pathlib import Path


class SecretFileError(ValueError):
    """A secret file that cannot be read or whose first line is empty; the message names the file."""


def first_line(path: str | Path) -> str:
    """The first line of ``path``; raises SecretFileError naming the file when it is unreadable or empty."""
    try:
        line = next(iter(Path(path).read_text(encoding="utf-8").splitlines()), "")
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{path}: not UTF-8 text (a secret file holds the secret on its first line)") from None
    if not line:
        raise SecretFileError(f"{path}: the first line (the secret) is empty")
    return line
