"""Answering an upstream's auth challenges: where credentials may go, and the tokens they buy.

A registry answers 401 with a challenge (`upstream.challenges`); for Bearer, a token comes
from the challenge's realm (the Docker token protocol's GET form) and is cached per
(upstream, origin that challenged, scope, principal) for its `expires_in` minus a margin, so a
warm mirror fetches tokens rarely and a token issued for one host is never shown to another.

Realm binding: a realm is named by whoever answers, and an upstream that is compromised or
intercepted could name one it owns. Credentials (a client's or the service account's) go only
to realms on the upstream's own host or on a host in its `token_realms`, and over https unless
the upstream itself is plain http. Anonymous token requests may go to any realm: a redirect
target such as an Artifact Registry region issues its own anonymous tokens.

The authorizer sends nothing itself: it is given a `FetchToken` that GETs a URL, so the whole
flow runs in tests without sockets.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

from cachetools import TLRUCache

from mirror.upstream.challenges import Challenge, parse_challenge
from mirror.upstream.credentials import Credentials
from mirror.upstream.errors import UpstreamError
from mirror.upstream.ratelimit import RateLimits
from mirror.upstream.urls import origin, shown

log = logging.getLogger("mirror.upstream")

TOKEN_MARGIN = 30.0
DEFAULT_TOKEN_TTL = 60.0


class TokenKey(NamedTuple):
    """What a cached token is for: the upstream, the origin (`scheme://host:port`) whose
    challenge it answers, the scope, and the principal's fingerprint."""

    upstream: str
    origin: str
    scope: str
    principal: str


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float


class TokenCache:
    """Tokens keyed by `TokenKey`, dropped before they expire."""

    def __init__(self, clock: Callable[[], float] = time.time, maxsize: int = 10_000) -> None:
        self._cache: TLRUCache[TokenKey, Token] = TLRUCache(
            maxsize, ttu=lambda _k, tok, _now: tok.expires_at, timer=clock
        )
        self._clock = clock

    def get(self, key: TokenKey) -> str | None:
        tok = self._cache.get(key)
        return tok.value if tok else None

    def put(self, key: TokenKey, value: str, expires_in: float | None) -> None:
        ttl = max((expires_in or DEFAULT_TOKEN_TTL) - TOKEN_MARGIN, 1.0)
        self._cache[key] = Token(value, self._clock() + ttl)

    def drop(self, key: TokenKey) -> None:
        self._cache.pop(key, None)


def token_url(realm: str, service: str | None, scopes: Iterable[str]) -> str:
    """The realm's URL asking for `scopes` of `service` (the Docker token protocol's GET form).

    Query parameters the realm already carries are kept as they are and ours are appended
    with `&`. ValueError when the realm is not an absolute http(s) URL, or carries userinfo
    or a fragment (no registry sends those: a realm that does is not one to talk to).
    """
    parts = urlsplit(realm.strip())
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError:
        raise ValueError(f"token realm {shown(realm)} has an invalid port") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"token realm {realm!r} is not an absolute http(s) URL")
    if "@" in parts.netloc:
        raise ValueError(f"token realm {shown(realm)} carries userinfo")
    if parts.fragment or realm.strip().endswith("#"):
        raise ValueError(f"token realm {shown(realm)} carries a fragment")
    ours = urlencode([("scope", s) for s in scopes] + ([("service", service)] if service else []))
    query = "&".join(q for q in (parts.query, ours) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


class RealmBinding:
    """Which token realms may receive an upstream's credentials.

    `token_realms` entries are `host` (any port) or `host:port` (that port only); the
    upstream's own host is always trusted, at any port. Realms must be https unless the
    upstream URL itself is http (tests, private networks).
    """

    def __init__(self, upstream: str, url: str, token_realms: Iterable[str]) -> None:
        parts = urlsplit(url)
        self.upstream = upstream
        self.host = (parts.hostname or "").lower()
        self._plain_http = parts.scheme.lower() == "http"
        self._trusted: list[tuple[str, int | None]] = [(self.host, None)]
        for entry in token_realms:
            where = urlsplit("//" + entry)
            self._trusted.append(((where.hostname or "").lower(), where.port))

    @property
    def trusted(self) -> list[str]:
        """The trusted realm hosts, for people: `host` or `host:port`."""
        return [f"{h}:{p}" if p else h for h, p in self._trusted]

    def refusal(self, realm_url: str) -> str | None:
        """Why credentials must not go to `realm_url` (a checked token URL), or None."""
        parts = urlsplit(realm_url)
        host, port = (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme != "https" and not self._plain_http:
            return (f"token realm {shown(realm_url)} is plain http: credentials go only over https "
                    f"(the upstream {self.upstream} is https)")
        if not any(host == h and (p is None or p == port) for h, p in self._trusted):
            return (f"token realm {shown(realm_url)} is not on {self.host} nor in "
                    f"upstreams.\"{self.upstream}\".token_realms ({', '.join(self.trusted[1:]) or 'empty'}): "
                    f"add its host there if it is this registry's token service")
        return None


@dataclass(frozen=True)
class TokenReply:
    """A token realm's answer: status, headers and at most a small body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


FetchToken = Callable[[str, Mapping[str, str]], Awaitable[TokenReply]]
"""GET the URL with the headers; raises UpstreamError when the realm cannot be reached."""


class Authorizer:
    """Tokens and challenge answers for one upstream."""

    def __init__(self, binding: RealmBinding, tokens: TokenCache, limits: RateLimits, fetch: FetchToken) -> None:
        self.binding = binding
        self.upstream = binding.upstream
        self._tokens = tokens
        self._limits = limits
        self._fetch = fetch

    def cached(self, key: TokenKey) -> str | None:
        """The `Authorization` value of a token cached for `key`, if any."""
        token = self._tokens.get(key)
        return f"Bearer {token}" if token else None

    async def answer(self, challenges: Iterable[str], key: TokenKey, creds: Credentials | None) -> str | None:
        """The `Authorization` value that answers a 401's `WWW-Authenticate` values, or None when
        there is nothing to offer (no usable challenge; Basic without credentials).

        `creds` must be None unless `key.origin` is the upstream's own: Basic credentials go to
        the origin that asked, and only there. Raises UpstreamError (see `token`).
        """
        challenge = parse_challenge(challenges)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return creds.basic if creds else None
        self._tokens.drop(key)
        return f"Bearer {await self.token(challenge, key, creds)}"

    async def token(self, challenge: Challenge, key: TokenKey, creds: Credentials | None) -> str:
        """A token from the challenge's realm for its scope (else the key's), cached under `key`.

        Raises UpstreamError: 502 for a realm that is not a usable URL (nothing is sent) or one
        the binding refuses credentials (nothing is sent, a warning is logged); 429 while the
        realm rate-limits this principal (a realm's 429 blocks it for Retry-After, as a
        registry's 429 blocks its GETs); 401/403 with the realm's reason when it refuses the
        credentials; 502 or 5xx for any other failure.
        """
        realm = challenge.realm or ""
        scopes = (challenge.params.get("scope") or key.scope).split(" ")
        try:
            url = token_url(realm, challenge.params.get("service"), [s for s in scopes if s])
        except ValueError as exc:
            raise UpstreamError(self.upstream, 502, f"unusable challenge from {key.origin}: {exc}; nothing was sent") from None
        if creds is not None and (why := self.binding.refusal(url)):
            log.warning("upstream %s: credentials not sent: %s", self.upstream, why)
            raise UpstreamError(self.upstream, 502, f"credentials not sent: {why}")
        throttled = f"{key.principal} at {origin(url)}"
        if wait := self._limits.blocked_for(self.upstream, throttled):
            raise UpstreamError(self.upstream, 429, f"token realm {shown(realm)} is rate-limiting; retry in {wait:.0f}s",
                                str(int(wait) + 1))
        reply = await self._fetch(url, {"Authorization": creds.basic} if creds else {})
        if reply.status == 429:
            self._limits.block(self.upstream, throttled, reply.headers.get("Retry-After"))
            raise UpstreamError(self.upstream, 429, f"token realm {shown(realm)} is rate-limiting",
                                reply.headers.get("Retry-After"))
        if reply.status in (401, 403):
            raise UpstreamError(self.upstream, reply.status, f"credentials refused: {_refusal_reason(reply)}")
        if reply.status != 200:
            raise UpstreamError(self.upstream, reply.status if reply.status >= 500 else 502,
                                f"token realm {shown(realm)} answered {reply.status}")
        try:
            data = json.loads(reply.body)
            token = data.get("token") or data["access_token"]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise UpstreamError(self.upstream, 502, f"token realm {shown(realm)} sent no token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError(self.upstream, 502, f"token realm {shown(realm)} sent no token")
        expires_in = data.get("expires_in")
        self._tokens.put(key, token, expires_in if isinstance(expires_in, (int, float)) else None)
        return token

    async def login(self, challenge: Challenge, at: str, repos: list[str], creds: Credentials) -> None:
        """Check `creds` at the realm of `challenge` (from origin `at`) for pulling `repos`; the
        token granted is kept for each of them. Raises UpstreamError as `token` does."""
        scopes = " ".join(f"repository:{r}:pull" for r in repos)
        params = {k: v for k, v in challenge.params.items() if k != "scope"} | ({"scope": scopes} if scopes else {})
        token = await self.token(Challenge("bearer", params), TokenKey(self.upstream, at, scopes, creds.fingerprint), creds)
        for repo in repos:
            self._tokens.put(TokenKey(self.upstream, at, f"repository:{repo}:pull", creds.fingerprint), token, None)


def _refusal_reason(reply: TokenReply) -> str:
    """The reason a token endpoint gave for refusing (Docker Hub: `details`; OAuth: `error`)."""
    try:
        data = json.loads(reply.body)
    except ValueError:
        return str(reply.status)
    if isinstance(data, dict):
        for key in ("details", "error_description", "message", "error"):
            if isinstance(data.get(key), str):
                return data[key]
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("message"):
            return str(errors[0]["message"])
    return str(reply.status)
