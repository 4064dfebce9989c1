"""ed25519 keys and manifest signatures (docs/bundle.md, "Signature")."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from contract.bundle import MANIFEST, SIGNATURE


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a PEM private key (mode 600) and its PEM public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def check_private_key_mode(path: Path) -> None:
    """ValueError naming the file when every user of this host may read or write the private key (like ssh, which
    ignores such a key): whoever reads it can sign a bundle every station accepts. Group access is allowed (a
    service group, as for the broker's TLS key); keygen writes mode 600."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o007:
        raise ValueError(f"{path}: private key open to every user of this host (mode {mode:04o}); anyone could sign "
                         f"bundles with it: chmod 600 {path}")


def load_private_key(path: Path):
    """The ed25519 private key in ``path`` (PEM PKCS8 or raw 32 bytes); ValueError naming the file when it is no
    such key or every user of this host may read it (check_private_key_mode)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = Path(path).read_bytes()
    try:
        key = (serialization.load_pem_private_key(data, password=None) if data.startswith(b"-----BEGIN")
               else Ed25519PrivateKey.from_private_bytes(data))
    except ValueError as exc:
        raise ValueError(f"{path}: not an unencrypted ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an ed25519 private key")
    check_private_key_mode(Path(path))
    return key


def check_private_key(path: Path, flag: str = "--sign-key"):
    """The key in ``path`` (load_private_key), or ValueError naming ``flag`` and the file and why it cannot sign:
    unreadable, no unencrypted ed25519 private key, or open to every user of this host. Export, enrolment and
    retraining call it before any work, not when their bundle is signed at the end."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return load_private_key(Path(path))
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read the private key ({exc.strerror or exc})") from None
    except ValueError as exc:       # load_private_key names the file
        raise ValueError(f"{flag}: {exc}") from None
    except (TypeError, UnsupportedAlgorithm) as exc:     # TypeError: an encrypted key (no password given)
        raise ValueError(f"{flag} {path}: not an unencrypted ed25519 private key ({exc})") from None


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> Path:
    """Sign the exact bytes of the bundle's manifest.json; returns the signature file."""
    key = load_private_key(private_key_path)
    out = Path(bundle_dir) / SIGNATURE
    out.write_bytes(key.sign((Path(bundle_dir) / MANIFEST).read_bytes()))
    return out
