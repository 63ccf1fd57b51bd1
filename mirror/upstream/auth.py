"""Upstream authentication: credentials, challenge parsing and a token cache.

Registries answer 401 with `WWW-Authenticate: Bearer realm=..,service=..,scope=..`;
the token from the realm is cached per (upstream, scope, principal) for its
`expires_in` minus a margin, so a warm mirror fetches tokens rarely.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from cachetools import TLRUCache

_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
TOKEN_MARGIN = 30.0
DEFAULT_TOKEN_TTL = 60.0


ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Credentials:
    """A username and secret, sent upstream on someone's behalf; only the fingerprint is shown."""

    username: str
    password: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """Identifies the credential in caches and logs without revealing it."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()[:16]

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @classmethod
    def from_basic(cls, value: str) -> Credentials:
        """Parse the part after `Basic `; ValueError when it is not base64 `user:password`."""
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("Basic credentials are not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise ValueError("Basic credentials are not base64 of user:password")
        return cls(username, password)


def fingerprint(creds: Credentials | None) -> str:
    return creds.fingerprint if creds else ANONYMOUS


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge | None:
    """Parse one `WWW-Authenticate` value; None when it is not Bearer or Basic."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM_RE.finditer(rest)}
    return Challenge(scheme, params)


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float


class TokenCache:
    """Tokens keyed by (upstream, scope, principal fingerprint), dropped before they expire."""

    def __init__(self, clock: Callable[[], float] = time.time, maxsize: int = 10_000) -> None:
        self._cache: TLRUCache[tuple[str, str, str], Token] = TLRUCache(
            maxsize, ttu=lambda _k, tok, _now: tok.expires_at, timer=clock
        )
        self._clock = clock

    def get(self, key: tuple[str, str, str]) -> str | None:
        tok = self._cache.get(key)
        return tok.value if tok else None

    def put(self, key: tuple[str, str, str], value: str, expires_in: float | None) -> None:
        ttl = max((expires_in or DEFAULT_TOKEN_TTL) - TOKEN_MARGIN, 1.0)
        self._cache[key] = Token(value, self._clock() + ttl)

    def drop(self, key: tuple[str, str, str]) -> None:
        self._cache.pop(key, None)
