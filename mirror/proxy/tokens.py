"""The mirror's own token realm: clients log in here, the upstream checks their credentials.

`/v2/` challenges clients with `Bearer realm="<mirror>/token"`, as Docker Hub
does. A client that brings credentials to `/token` has them checked at the
upstream's realm; the opaque token it gets back stands for those credentials,
so the mirror can act upstream on that client's behalf (pulls count against its
own quota, its private repositories work). Tokens live in memory only: after a
restart clients are challenged again and log in again, transparently.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from cachetools import TTLCache

from mirror.errors import RegistryError
from mirror.upstream.auth import Credentials
from mirror.upstream.client import Upstream, UpstreamError

TOKEN_TTL = 900
REFRESH_TTL = 7 * 86_400
LOGIN_TTL = 300.0
SERVICE = "mirror"


@dataclass(frozen=True)
class Grant:
    """What a token stands for: a client's credentials (None: anonymous)."""

    credentials: Credentials | None


class TokenService:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: TTLCache[str, Grant] = TTLCache(200_000, TOKEN_TTL, timer=clock)
        self._refresh: TTLCache[str, Grant] = TTLCache(100_000, REFRESH_TTL, timer=clock)
        self._logins: TTLCache[tuple[str, str], bool] = TTLCache(100_000, LOGIN_TTL, timer=clock)

    def resolve(self, token: str) -> Grant | None:
        """The grant behind a token this mirror issued and that has not expired."""
        return self._tokens.get(token)

    def refresh(self, refresh_token: str) -> Grant | None:
        return self._refresh.get(refresh_token)

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
        token = secrets.token_urlsafe(32)
        self._tokens[token] = grant
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_TTL,
            "issued_at": datetime.fromtimestamp(self._clock(), timezone.utc).isoformat(),
        }
        if offline and grant.credentials is not None:
            refresh = secrets.token_urlsafe(32)
            self._refresh[refresh] = grant
            body["refresh_token"] = refresh
        return body


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
            return Credentials.from_basic(value)
        except ValueError as exc:
            raise RegistryError("UNAUTHORIZED", 401, f"malformed Authorization header: {exc}") from None
    if scheme.lower() == "bearer":
        grant = tokens.resolve(value.strip())
        if grant is None:
            raise RegistryError("UNAUTHORIZED", 401, "unknown or expired token: log in to this mirror again")
        return grant.credentials
    raise RegistryError("UNAUTHORIZED", 401, f"unsupported Authorization scheme {scheme[:20]!r}: use Basic or Bearer")
