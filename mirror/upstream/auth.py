"""Upstream authentication: challenge parsing and a token cache.

Registries answer 401 with `WWW-Authenticate: Bearer realm=..,service=..,scope=..`;
the token from the realm is cached per (upstream, scope, principal) for its
`expires_in` minus a margin, so a warm mirror fetches tokens rarely.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from cachetools import TLRUCache

_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
TOKEN_MARGIN = 30.0
DEFAULT_TOKEN_TTL = 60.0


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
