"""The mirror's own token realm: clients log in here, the upstream checks their credentials.

`/v2/` challenges clients with `Bearer realm="<mirror>/token"`, as Docker Hub
does. A client that brings credentials to `/token` has them checked at the
upstream's realm; the token it gets back stands for those credentials, so the
mirror can act upstream on that client's behalf (pulls count against its own
quota, its private repositories work).

A token carries its grant, encrypted and authenticated (Fernet) with a key derived
from the data directory's secret: every worker process reads the tokens any of them
issued, they keep working across restarts, and a client can neither read nor forge one.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from cachetools import LRUCache, TTLCache
from cryptography.fernet import Fernet, InvalidToken

from mirror.errors import RegistryError
from mirror.upstream.client import Upstream
from mirror.upstream.credentials import Credentials, Fingerprinter
from mirror.upstream.errors import UpstreamError

TOKEN_TTL = 900
REFRESH_TTL = 7 * 86_400
LOGIN_TTL = 300.0
SERVICE = "mirror"


@dataclass(frozen=True)
class Grant:
    """What a token stands for: a client's credentials (None: anonymous)."""

    credentials: Credentials | None


class TokenService:
    """Issues and reads the mirror's tokens; `key` (32 bytes) seals them, `fingerprints` makes
    the credentials they carry."""

    def __init__(self, key: bytes, fingerprints: Fingerprinter, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.fingerprints = fingerprints
        # Decrypting costs more than the rest of a cached manifest request: each token once.
        self._known: LRUCache[str, tuple[Grant, float]] = LRUCache(100_000)
        self._logins: TTLCache[tuple[str, str], bool] = TTLCache(100_000, LOGIN_TTL, timer=clock)

    def resolve(self, token: str) -> Grant | None:
        """The grant behind an access token this mirror issued and that has not expired."""
        return self._open(token, "access", TOKEN_TTL)

    def still_accepted(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value `client_credentials` accepted before is accepted now:
        a token this mirror issued expires; Basic credentials and none do not."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        return scheme.lower() != "bearer" or self.resolve(value.strip()) is not None

    def refresh(self, refresh_token: str) -> Grant | None:
        return self._open(refresh_token, "refresh", REFRESH_TTL)

    async def login(self, upstream: Upstream, creds: Credentials, repos: list[str]) -> None:
        """Check credentials at the upstream (remembered for a few minutes); raise 401 if refused."""
        key = (upstream.name, creds.fingerprint)
        if key in self._logins:
            return
        try:
            await upstream.login(creds, repos)
        except UpstreamError as exc:
            if exc.status in (401, 403):
                raise RegistryError("UNAUTHORIZED", 401, f"{upstream.name} refused the credentials of "
                                    f"{creds.username!r}: {exc.message.removeprefix('credentials refused: ')}") from None
            raise exc.to_registry_error("UNAUTHORIZED") from None
        self._logins[key] = True

    def issue(self, grant: Grant, offline: bool = False) -> dict[str, object]:
        """A token response in the shape Docker's and containerd's clients expect."""
        now = self._clock()
        token = self._seal(grant, "access", now)
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_TTL,
            "issued_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        }
        if offline and grant.credentials is not None:
            body["refresh_token"] = self._seal(grant, "refresh", now)
        return body

    def _seal(self, grant: Grant, use: str, now: float) -> str:
        creds = grant.credentials
        payload = {"use": use, "user": creds.username, "secret": creds.password} if creds else {"use": use}
        return self._fernet.encrypt_at_time(json.dumps(payload).encode(), int(now)).decode()

    def _open(self, token: str, use: str, ttl: int) -> Grant | None:
        now = self._clock()
        known = self._known.get(token)
        if known is not None:
            return known[0] if now < known[1] else None
        try:
            sealed_at = self._fernet.extract_timestamp(token)
            payload = json.loads(self._fernet.decrypt_at_time(token, ttl, int(now)))
        except (InvalidToken, ValueError, TypeError):
            return None
        if not isinstance(payload, dict) or payload.get("use") != use:
            return None
        user, secret = payload.get("user"), payload.get("secret")
        grant = Grant(self.fingerprints.credentials(user, secret) if isinstance(user, str) and isinstance(secret, str) else None)
        self._known[token] = (grant, sealed_at + ttl)
        return grant


def challenge(realm_base: str, ns: str | None, repo: str | None) -> str:
    """The `WWW-Authenticate` value that sends a client to this mirror's token realm."""
    realm = f"{realm_base}/token" + (f"?ns={ns}" if ns else "")
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    if repo:
        value += f',scope="repository:{repo}:pull"'
    return value


def client_credentials(tokens: TokenService, authorization: str | None) -> Credentials | None:
    """Who the client is: Basic credentials, a token this mirror issued, or nobody."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            return tokens.fingerprints.from_basic(value)
        except ValueError as exc:
            raise RegistryError("UNAUTHORIZED", 401, f"malformed Authorization header: {exc}") from None
    if scheme.lower() == "bearer":
        grant = tokens.resolve(value.strip())
        if grant is None:
            raise RegistryError("UNAUTHORIZED", 401, "unknown or expired token: log in to this mirror again")
        return grant.credentials
    raise RegistryError("UNAUTHORIZED", 401, f"unsupported Authorization scheme {scheme[:20]!r}: use Basic or Bearer")
