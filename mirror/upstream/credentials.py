"""Credentials sent upstream on someone's behalf, and the fingerprints that stand for them.

A fingerprint identifies a credential in caches, access decisions (stored in index.db) and
logs without revealing it: HMAC-SHA256 under a key derived from the data directory's secret
(`storage.secret`), so nothing stored can be checked against a guessed password without that
key, and every worker and every restart computes the same fingerprint for the same credential.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Credentials:
    """A username and secret, and the fingerprint that stands for them; build with `Fingerprinter`."""

    username: str
    password: str = field(repr=False)
    fingerprint: str = field(repr=False, compare=False)

    @property
    def basic(self) -> str:
        """The `Authorization` value of HTTP Basic (RFC 7617)."""
        return basic_authorization(self.username, self.password)


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class Fingerprinter:
    """Makes `Credentials`, fingerprinted under `key` (32 bytes)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def credentials(self, username: str, password: str) -> Credentials:
        mac = hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256)
        return Credentials(username, password, mac.hexdigest())

    def from_basic(self, value: str) -> Credentials:
        """Credentials from the part of a Basic `Authorization` after `Basic `.

        ValueError when it is not base64 of `user:password` with a non-empty user.
        """
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("Basic credentials are not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise ValueError("Basic credentials are not base64 of user:password")
        return self.credentials(username, password)


def fingerprint(creds: Credentials | None) -> str:
    """The fingerprint of `creds`, or ANONYMOUS for nobody."""
    return creds.fingerprint if creds else ANONYMOUS
