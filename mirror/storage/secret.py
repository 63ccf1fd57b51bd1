"""The data directory's secret: a random key, created with the directory, that keys what the
mirror must not reveal and must recognise again after a restart and in every worker.

`<data>/secret` holds 32 random bytes, mode 0600. Keys for each purpose are derived from it
with HKDF-SHA256 (RFC 5869), so one file serves credential fingerprints and the sealing of the
mirror's own tokens without either key telling anything about the other. The secret is never
logged; losing it forgets access decisions and logs clients out, nothing else.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_FILE = "secret"
SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file cannot be used as it is; the message says why and what to do."""


def data_dir_secret(data_dir: Path) -> bytes:
    """The secret of `data_dir`, created (mode 0600) when the directory has none.

    Creation is atomic and race-free: the bytes are written to a private temporary file that is
    then hard-linked into place, so concurrent starters all end up reading the one that won.
    Raises SecretError when the file is not a regular file, can be read by others than its
    owner, or does not hold exactly SECRET_BYTES bytes; nothing is changed then.
    """
    path = data_dir / SECRET_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(SECRET_BYTES))
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: theirs is the one
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise SecretError(f"{path} is not a regular file: move it away so that a new secret is created")
    if info.st_mode & 0o077:
        raise SecretError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: it must be readable by its owner "
                          f"only (chmod 600 {path})")
    value = path.read_bytes()
    if len(value) != SECRET_BYTES:
        raise SecretError(f"{path} holds {len(value)} bytes instead of {SECRET_BYTES}: restore it, or delete it "
                          f"to create a new one (clients then log in again and access is checked anew)")
    return value


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for `purpose` (e.g. "fingerprint", "tokens"), independent of every other."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"mirror {purpose}".encode())
    return hkdf.derive(secret)
