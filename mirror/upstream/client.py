"""One upstream registry: pooled HTTP, the Bearer token dance, redirects, clear failures.

Timeouts bound connecting and every read (first byte and a stalled body alike),
so a hung upstream becomes an `UpstreamError` the proxy can serve stale content
around, never a client that hangs with it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from mirror.config import UpstreamConfig
from mirror.errors import NeedsPrimary, RegistryError
from mirror.metrics import Metrics
from mirror.upstream.auth import Challenge, Credentials, TokenCache, fingerprint, parse_challenge
from mirror.upstream.ratelimit import RateLimits

log = logging.getLogger("mirror.upstream")

MANIFEST_MAX_BYTES = 4 << 20
MAX_REDIRECTS = 5
READ_BUFFER = 1 << 20  # large reads of blob bodies: few wake-ups, few writes


class UpstreamError(Exception):
    """The upstream could not be reached (status None) or answered with an error status."""

    def __init__(self, upstream: str, status: int | None, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"upstream {upstream}: {message}")
        self.upstream = upstream
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def outage(self) -> bool:
        """Down, failing or rate-limiting: cached content may stand in for an answer."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def reason(self) -> str:
        """A short label for metrics: unreachable, 5xx or ratelimited."""
        if self.status is None:
            return "unreachable"
        return "ratelimited" if self.status == 429 else "5xx"

    def to_registry_error(self, unknown_code: str) -> RegistryError:
        """The answer a client gets when we have nothing better to give it."""
        text = f"upstream {self.upstream}: {self.message}"
        if self.status is None:
            return RegistryError("UNAVAILABLE", 503, text)
        if self.status == 404:
            return RegistryError(unknown_code, 404, text)
        if self.status == 401:
            return RegistryError("UNAUTHORIZED", 401, text)
        if self.status == 403:
            return RegistryError("DENIED", 403, text)
        if self.status == 429:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return RegistryError("TOOMANYREQUESTS", 429, text, headers=headers)
        if self.status >= 500:
            return RegistryError("UNAVAILABLE", 502, text)
        return RegistryError("UNKNOWN", self.status, text)


@dataclass(frozen=True)
class ManifestHead:
    """What a manifest probe learned; `body` is set when the probe had to be a GET."""

    digest: str | None
    media_type: str
    size: int | None
    body: bytes | None = None


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str | None


def _describe(exc: BaseException, url: str) -> str:
    """Why a request could not be made, in words an operator can act on."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out talking to {urlsplit(url).netloc}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {exc.host} not trusted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class Upstream:
    def __init__(
        self, config: UpstreamConfig, tokens: TokenCache, limits: RateLimits, metrics: Metrics,
        local_only: bool = False,
    ) -> None:
        self.config = config
        self.local_only = local_only  # in a secondary worker: upstream requests go to the primary
        self.name = config.name
        self.url = config.url
        self.service_account = (
            Credentials(config.username, config.password) if config.username and config.password is not None else None
        )
        self._tokens = tokens
        self._limits = limits
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        """Verified TLS: aiohttp's shared default context, or one trusting `ca_file`."""
        if self.config.insecure_skip_verify:
            return False
        if self.config.ca_file:
            return ssl.create_default_context(cafile=self.config.ca_file)
        return True

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300, ssl=self._ssl()),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.config.connect_timeout,
                    sock_read=self.config.read_timeout,
                ),
                auto_decompress=False,
                read_bufsize=READ_BUFFER,
                headers={"User-Agent": "mirror/0.1 (pull-through cache)"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- requests ---------------------------------------------------------------
    async def _send(self, method: str, url: str, kind: str, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        if self.local_only:
            raise NeedsPrimary()
        try:
            resp = await self.session.request(method, url, headers=headers, allow_redirects=False)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            self._count(method, kind, "timeout" if isinstance(exc, asyncio.TimeoutError) else "error")
            raise UpstreamError(self.name, None, _describe(exc, url)) from None
        self._count(method, kind, str(resp.status))
        self._limits.observe(self.name, resp.headers)
        return resp

    def _count(self, method: str, kind: str, status: str) -> None:
        self._metrics.upstream_requests.labels(self.name, method, kind, status).inc()

    async def request(
        self, method: str, repo: str, path: str, kind: str, creds: Credentials | None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send to `/v2/<repo>/<path>` as `creds`, answering one auth challenge; follows redirects.

        A principal that upstream rate-limited sends no GET until its Retry-After has passed.
        """
        who = fingerprint(creds)
        wait = self._limits.blocked_for(self.name, who) if method == "GET" else 0.0
        if wait:
            raise UpstreamError(self.name, 429, f"rate-limited by the upstream; retry in {wait:.0f}s", str(int(wait) + 1))
        url = f"{self.url}/v2/{repo}/{path}"
        hdrs = dict(headers or {})
        key = (self.name, f"repository:{repo}:pull", who)
        token = self._tokens.get(key)
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        resp = await self._send(method, url, kind, hdrs)
        if resp.status == 401:
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            authorization = await self._answer(challenge, key, creds) if challenge else None
            if authorization:
                resp.release()
                hdrs["Authorization"] = authorization
                resp = await self._send(method, url, kind, hdrs)
        if resp.status == 429:
            self._limits.block(self.name, who, resp.headers.get("Retry-After"))
        return await self._follow(resp, method, kind, url, hdrs)

    async def _answer(
        self, challenge: Challenge, key: tuple[str, str, str], creds: Credentials | None
    ) -> str | None:
        """The Authorization header that answers `challenge`, or None when we have nothing to offer."""
        if challenge.scheme == "basic":
            return creds.basic if creds else None
        if not challenge.realm:
            return None
        self._tokens.drop(key)
        return f"Bearer {await self._fetch_token(challenge.params, key, creds)}"

    async def _follow(
        self, resp: aiohttp.ClientResponse, method: str, kind: str, url: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Follow redirects (blob CDNs); the registry's credentials never go to another origin."""
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return resp
            resp.release()
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
            resp = await self._send(method, url, kind, headers)
        resp.release()
        raise UpstreamError(self.name, 502, f"more than {MAX_REDIRECTS} redirects")

    async def _fetch_token(
        self, params: Mapping[str, str], key: tuple[str, str, str], creds: Credentials | None
    ) -> str:
        query = [("scope", s) for s in (params.get("scope") or key[1]).split(" ") if s]
        if params.get("service"):
            query.append(("service", params["service"]))
        url = f"{params['realm']}?{urlencode(query)}"
        resp = await self._send("GET", url, "token", {"Authorization": creds.basic} if creds else {})
        async with resp:
            if resp.status in (401, 403):
                raise UpstreamError(self.name, resp.status, f"credentials refused: {await _token_error(resp)}")
            if resp.status != 200:
                raise UpstreamError(self.name, resp.status if resp.status >= 500 else 502,
                                    f"token endpoint {params['realm']} answered {resp.status}")
            try:
                data = json.loads(await resp.read())
                token = data.get("token") or data["access_token"]
            except (ValueError, KeyError, AttributeError):
                raise UpstreamError(self.name, 502, f"token endpoint {params['realm']} sent no token") from None
        self._tokens.put(key, token, data.get("expires_in"))
        return token

    async def _raise_for(self, resp: aiohttp.ClientResponse, what: str) -> None:
        """Raise an UpstreamError carrying upstream's own message for a non-2xx answer."""
        if resp.status < 300:
            return
        message = f"{what}: {resp.status} {resp.reason}"
        try:
            body = await resp.content.read(8192)
            errors = json.loads(body).get("errors") or []
            if errors and errors[0].get("message"):
                message = f"{what}: {errors[0]['message']}"
        except (ValueError, AttributeError, aiohttp.ClientError, asyncio.TimeoutError):
            pass
        finally:
            resp.release()
        raise UpstreamError(self.name, resp.status, message, resp.headers.get("Retry-After"))

    async def _read_small(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """A whole JSON body (manifest, tag list), refusing one larger than any sane manifest."""
        if (resp.content_length or 0) > MANIFEST_MAX_BYTES:
            raise UpstreamError(self.name, 502, f"{what} is larger than {MANIFEST_MAX_BYTES} bytes")
        body = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > MANIFEST_MAX_BYTES:
                    raise UpstreamError(self.name, 502, f"{what} is larger than {MANIFEST_MAX_BYTES} bytes")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(self.name, None, f"reading {what}: {exc or 'timed out'}") from None
        return bytes(body)

    # -- registry operations ---------------------------------------------------
    async def head_manifest(self, repo: str, ref: str, accept: str, creds: Credentials | None) -> ManifestHead:
        resp = await self.request("HEAD", repo, f"manifests/{ref}", "manifest", creds, {"Accept": accept})
        await self._raise_for(resp, f"manifest {repo}:{ref}")
        resp.release()
        return ManifestHead(
            resp.headers.get("Docker-Content-Digest"),
            resp.headers.get("Content-Type", "").split(";")[0].strip(),
            resp.content_length,
        )

    async def get_manifest(self, repo: str, ref: str, accept: str, creds: Credentials | None) -> Manifest:
        resp = await self.request("GET", repo, f"manifests/{ref}", "manifest", creds, {"Accept": accept})
        await self._raise_for(resp, f"manifest {repo}:{ref}")
        async with resp:
            body = await self._read_small(resp, f"manifest {repo}:{ref}")
        self._metrics.upstream_bytes.labels(self.name).inc(len(body))
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return Manifest(body, media_type, resp.headers.get("Docker-Content-Digest"))

    async def head_blob(self, repo: str, digest: str, creds: Credentials | None) -> int | None:
        resp = await self.request("HEAD", repo, f"blobs/{digest}", "blob", creds)
        await self._raise_for(resp, f"blob {digest}")
        resp.release()
        return resp.content_length

    async def open_blob(self, repo: str, digest: str, creds: Credentials | None) -> aiohttp.ClientResponse:
        """A 200 response whose body the caller streams and then releases."""
        resp = await self.request("GET", repo, f"blobs/{digest}", "blob", creds)
        await self._raise_for(resp, f"blob {digest}")
        if resp.status != 200:
            resp.release()
            raise UpstreamError(self.name, 502, f"blob {digest}: unexpected status {resp.status}")
        return resp

    async def get_tags(self, repo: str, query: str, creds: Credentials | None) -> tuple[bytes, str | None]:
        """The tag list body and its `Link` header (pagination)."""
        path = f"tags/list?{query}" if query else "tags/list"
        resp = await self.request("GET", repo, path, "tags", creds)
        await self._raise_for(resp, f"tags of {repo}")
        async with resp:
            body = await self._read_small(resp, f"tags of {repo}")
        return body, resp.headers.get("Link")

    async def login(self, creds: Credentials, repos: list[str]) -> None:
        """Check `creds` the way upstream would: its realm must grant them a token.

        Raises UpstreamError (401 with upstream's message) when they are refused.
        A token granted for `repos` is kept, so the pulls that follow need no second exchange.
        """
        resp = await self._send("GET", f"{self.url}/v2/", "base", {})
        resp.release()
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", "")) if resp.status == 401 else None
        if challenge is None:
            return  # upstream asks for no credentials: nothing to check them against
        if challenge.scheme == "basic":
            resp = await self._send("GET", f"{self.url}/v2/", "base", {"Authorization": creds.basic})
            resp.release()
            if resp.status in (401, 403):
                raise UpstreamError(self.name, resp.status, "credentials refused")
            return
        scopes = " ".join(f"repository:{r}:pull" for r in repos)
        key = (self.name, scopes or "", creds.fingerprint)
        params = {**challenge.params, "scope": scopes} if scopes else {k: v for k, v in challenge.params.items() if k != "scope"}
        token = await self._fetch_token(params, key, creds)
        for repo in repos:
            self._tokens.put((self.name, f"repository:{repo}:pull", creds.fingerprint), token, None)


async def _token_error(resp: aiohttp.ClientResponse) -> str:
    """The reason a token endpoint gave for refusing (Docker Hub: `details`; OAuth: `error`)."""
    try:
        data = json.loads(await resp.content.read(8192))
    except (ValueError, aiohttp.ClientError, asyncio.TimeoutError):
        return f"{resp.status} {resp.reason}"
    if isinstance(data, dict):
        for key in ("details", "error_description", "message", "error"):
            if isinstance(data.get(key), str):
                return data[key]
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("message"):
            return str(errors[0]["message"])
    return f"{resp.status} {resp.reason}"
