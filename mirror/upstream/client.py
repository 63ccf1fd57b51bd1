"""One upstream registry: pooled HTTP, the Bearer token dance, redirects, clear failures.

Any request may be redirected (registry.k8s.io sends every `/v2/` request to a regional
registry; registries on S3 send manifests and blobs to presigned storage URLs). Each hop
runs the token flow against whichever origin challenges it, with tokens cached per origin,
and a hop never carries a credential or token issued for another origin.

Timeouts bound connecting and every read (first byte and a stalled body alike),
so a hung upstream becomes an `UpstreamError` the proxy can serve stale content
around, never a client that hangs with it.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from mirror.config import UpstreamConfig
from mirror.errors import NeedsPrimary, RegistryError
from mirror.metrics import Metrics
from mirror.upstream.auth import (
    Challenge, Credentials, TokenCache, TokenKey, fingerprint, parse_challenge, token_url,
)
from mirror.upstream.ratelimit import DEFAULT_RETRY_AFTER, RateLimits

log = logging.getLogger("mirror.upstream")

MANIFEST_MAX_BYTES = 4 << 20
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# A HEAD that tells nothing about the manifest: the method is not supported (405, 501).
# Storage a registry redirected to may refuse a HEAD in any 4xx way (S3: 403 for a URL signed for GET).
HEAD_NOT_SUPPORTED = frozenset({405, 501})
READ_BUFFER = 1 << 20  # large reads of blob bodies: few wake-ups, few writes
_API_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        """The answer a client gets when we have nothing better to give it.

        A 429 always carries `Retry-After` (upstream's when it gave a usable one), so clients
        back off instead of retrying at once.
        """
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
            return RegistryError("TOOMANYREQUESTS", 429, text, headers={"Retry-After": retry_after_value(self.retry_after)})
        if self.status >= 500:
            return RegistryError("UNAVAILABLE", 502, text)
        return RegistryError("UNKNOWN", self.status, text)


def retry_after_value(value: str | None) -> str:
    """A `Retry-After` to relay (RFC 9110 §10.2.3): upstream's seconds or HTTP date, else our default."""
    value = (value or "").strip()
    if value.isdigit():
        return value
    try:
        if value and email.utils.parsedate_to_datetime(value):
            return value
    except (TypeError, ValueError):
        pass
    return str(int(DEFAULT_RETRY_AFTER))


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


def origin(url: str) -> str:
    """`scheme://host:port` of a URL (RFC 6454), the port made explicit: what a token or
    credential is bound to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def shown(url: str) -> str:
    """A URL for messages and logs: no query (presigned URLs carry signatures there), no userinfo."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def api_scope(url: str) -> str | None:
    """`repository:<name>:pull` for a registry API URL (`/v2/<name>/manifests/…` and the like)."""
    match = _API_PATH.match(urlsplit(url).path)
    return f"repository:{match['name']}:pull" if match else None


class Upstream:
    def __init__(
        self, config: UpstreamConfig, tokens: TokenCache, limits: RateLimits, metrics: Metrics,
        local_only: bool = False,
    ) -> None:
        self.config = config
        self.local_only = local_only  # in a secondary worker: upstream requests go to the primary
        self.name = config.name
        self.url = config.url
        self.origin = origin(config.url)
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

    def speaks_registry_api(self, url: str) -> bool:
        """Whether an answer from `url` is the registry's word: its own origin, or a registry API
        path on a host it redirected to (registry.k8s.io's regional registries). Anything else
        (presigned storage, a CDN) only stores bytes: its refusals are failures, not verdicts."""
        return origin(url) == self.origin or _API_PATH.match(urlsplit(url).path) is not None

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
        """Send to `/v2/<repo>/<path>` as `creds`, following redirects and answering the auth
        challenge of each origin on the way (see `_exchange`).

        A principal that upstream rate-limited sends no GET until its Retry-After has passed.
        Raises UpstreamError when upstream cannot be reached, a token is refused or rate-limited,
        or the redirects loop or go on too long.
        """
        who = fingerprint(creds)
        wait = self._limits.blocked_for(self.name, who) if method == "GET" else 0.0
        if wait:
            raise UpstreamError(self.name, 429, f"rate-limited by the upstream; retry in {wait:.0f}s", str(int(wait) + 1))
        resp = await self._exchange(method, f"{self.url}/v2/{repo}/{path}", kind, creds, headers or {})
        if resp.status == 429:
            self._limits.block(self.name, who, resp.headers.get("Retry-After"))
        return resp

    async def _exchange(
        self, method: str, url: str, kind: str, creds: Credentials | None, headers: Mapping[str, str],
        answer_challenges: bool = True,
    ) -> aiohttp.ClientResponse:
        """The final answer to `method url`, after at most MAX_REDIRECTS redirects.

        Every 301/302/303/307/308 is followed with the same method (we only GET and HEAD);
        a relative `Location` is resolved against the URL that sent it (RFC 9110 §10.2.2).
        Each hop carries only what its own origin issued (see `_authorized`), for the scope of
        the last registry API path on the way (a download path keeps the scope that led to it).
        A Location that was already visited is a loop; both it and too many hops raise
        UpstreamError (502).
        """
        visited, scope = {url}, ""
        for _ in range(MAX_REDIRECTS + 1):
            scope = api_scope(url) or scope
            if answer_challenges:
                resp = await self._authorized(method, url, kind, creds, headers, scope)
            else:
                resp = await self._send(method, url, kind, headers)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            target = _resolve(url, location)
            if target is None:
                raise UpstreamError(self.name, 502, f"{shown(url)} redirected to an unusable location")
            if target in visited:
                raise UpstreamError(self.name, 502, f"redirect loop: {shown(url)} sent us back to {shown(target)}")
            visited.add(target)
            url = target
        resp.release()
        raise UpstreamError(self.name, 502, f"more than {MAX_REDIRECTS} redirects, the last to {shown(url)}")

    async def _authorized(
        self, method: str, url: str, kind: str, creds: Credentials | None, headers: Mapping[str, str],
        scope: str,
    ) -> aiohttp.ClientResponse:
        """Send one hop with the token its origin issued for `scope` (if any); on a 401, answer
        the origin's challenge once and resend.

        `creds` are the registry's: they answer challenges of the upstream's own origin only;
        any other origin gets an anonymous token request, as containerd keeps credentials per host.
        """
        key = TokenKey(self.name, origin(url), scope, fingerprint(creds))
        hdrs = CIMultiDict(headers)
        if token := self._tokens.get(key):
            hdrs["Authorization"] = f"Bearer {token}"
        resp = await self._send(method, url, kind, hdrs)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.getall("WWW-Authenticate", []))
        own = creds if key.origin == self.origin else None
        authorization = await self._answer(challenge, key, own) if challenge else None
        if not authorization:
            return resp
        resp.release()
        hdrs["Authorization"] = authorization
        return await self._send(method, url, kind, hdrs)

    async def _answer(self, challenge: Challenge, key: TokenKey, creds: Credentials | None) -> str | None:
        """The Authorization header that answers `challenge`, or None when we have nothing to offer."""
        if challenge.scheme == "basic":
            return creds.basic if creds else None
        self._tokens.drop(key)
        return f"Bearer {await self._fetch_token(challenge, key, creds)}"

    async def _fetch_token(self, challenge: Challenge, key: TokenKey, creds: Credentials | None) -> str:
        """A token from the challenge's realm for its scope (else the key's), cached under `key`.

        Credentials go over https only, unless the upstream itself is plain http (tests,
        private networks). A realm that answers 429 blocks this principal's token requests to
        it for Retry-After, as a registry's 429 blocks its GETs; UpstreamError(429) meanwhile.
        """
        realm = challenge.realm or ""
        throttled = f"{key.principal} at {origin(realm)}"
        if wait := self._limits.blocked_for(self.name, throttled):
            raise UpstreamError(self.name, 429, f"token realm {shown(realm)} is rate-limiting; retry in {wait:.0f}s",
                                str(int(wait) + 1))
        scopes = (challenge.params.get("scope") or key.scope).split(" ")
        try:
            url = token_url(realm, challenge.params.get("service"), [s for s in scopes if s])
        except ValueError as exc:
            raise UpstreamError(self.name, 502, f"unusable challenge from {key.origin}: {exc}") from None
        headers = {"Authorization": creds.basic} if creds and self._may_send_credentials(url) else {}
        resp = await self._send("GET", url, "token", headers)
        async with resp:
            if resp.status == 429:
                self._limits.block(self.name, throttled, resp.headers.get("Retry-After"))
                raise UpstreamError(self.name, 429, f"token realm {shown(realm)} is rate-limiting",
                                    resp.headers.get("Retry-After"))
            if resp.status in (401, 403):
                raise UpstreamError(self.name, resp.status, f"credentials refused: {await _token_error(resp)}")
            if resp.status != 200:
                raise UpstreamError(self.name, resp.status if resp.status >= 500 else 502,
                                    f"token realm {shown(realm)} answered {resp.status}")
            try:
                data = json.loads(await resp.read())
                token = data.get("token") or data["access_token"]
            except (ValueError, KeyError, AttributeError, TypeError):
                raise UpstreamError(self.name, 502, f"token realm {shown(realm)} sent no token") from None
            if not isinstance(token, str) or not token:
                raise UpstreamError(self.name, 502, f"token realm {shown(realm)} sent no token")
        expires_in = data.get("expires_in")
        self._tokens.put(key, token, expires_in if isinstance(expires_in, (int, float)) else None)
        return token

    def _may_send_credentials(self, realm_url: str) -> bool:
        """Credentials travel encrypted, unless the upstream itself was configured as plain http."""
        if urlsplit(realm_url).scheme.lower() == "https" or self.origin.startswith("http://"):
            return True
        log.warning("upstream %s: not sending credentials to the plain-http realm %s", self.name, shown(realm_url))
        return False

    async def _raise_for(self, resp: aiohttp.ClientResponse, what: str) -> None:
        """Raise an UpstreamError for a non-2xx answer.

        The registry's own answers keep their status and message. Storage or a CDN the registry
        redirected to speaks for no one: its 4xx is a failure upstream (502) naming the host and
        status, never its body (S3 sends XML).
        """
        if resp.status < 300:
            return
        url = str(resp.url)
        if not self.speaks_registry_api(url):
            resp.release()
            status = resp.status if resp.status >= 500 else 502
            raise UpstreamError(self.name, status, f"{what}: {shown(url)}, where the registry sent us, "
                                f"answered {resp.status} {resp.reason or ''}".rstrip())
        if resp.status < 400:
            resp.release()
            raise UpstreamError(self.name, 502, f"{what}: unexpected {resp.status} {resp.reason or ''}".rstrip())
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
        """What upstream says `repo:ref` is, from a HEAD when it can tell.

        A HEAD that cannot tell falls back to one GET, whose body comes back in `body` with its
        sha256 digest: a HEAD refused by storage the registry redirected to (S3 presigned URLs
        are signed for GET and answer HEAD with 403), one that is not supported (405, 501), or a
        2xx without `Docker-Content-Digest`. The registry's own 401/403/404/429 and 5xx raise
        UpstreamError as they are.
        """
        what = f"manifest {repo}:{ref}"
        resp = await self.request("HEAD", repo, f"manifests/{ref}", "manifest", creds, {"Accept": accept})
        digest = resp.headers.get("Docker-Content-Digest")
        if resp.status < 300 and digest:
            resp.release()
            return ManifestHead(digest, _media_type(resp), resp.content_length)
        if not self._head_cannot_tell(resp):
            await self._raise_for(resp, what)
        resp.release()
        got = await self.get_manifest(repo, ref, accept, creds)
        return ManifestHead("sha256:" + hashlib.sha256(got.body).hexdigest(), got.media_type, len(got.body), got.body)

    def _head_cannot_tell(self, resp: aiohttp.ClientResponse) -> bool:
        if resp.status < 300 or resp.status in HEAD_NOT_SUPPORTED:
            return True
        return 400 <= resp.status < 500 and not self.speaks_registry_api(str(resp.url))

    async def get_manifest(self, repo: str, ref: str, accept: str, creds: Credentials | None) -> Manifest:
        """The manifest's bytes, the Content-Type they came with (storage may send
        `binary/octet-stream`: the caller decides what it is) and upstream's digest header."""
        resp = await self.request("GET", repo, f"manifests/{ref}", "manifest", creds, {"Accept": accept})
        await self._raise_for(resp, f"manifest {repo}:{ref}")
        async with resp:
            body = await self._read_small(resp, f"manifest {repo}:{ref}")
        self._metrics.upstream_bytes.labels(self.name).inc(len(body))
        return Manifest(body, _media_type(resp), resp.headers.get("Docker-Content-Digest"))

    async def head_blob(self, repo: str, digest: str, creds: Credentials | None) -> int | None:
        """The blob's size. Storage that refuses the HEAD it was redirected is asked for its first
        byte instead (a GET with `Range: bytes=0-0`; the size is in `Content-Range`)."""
        resp = await self.request("HEAD", repo, f"blobs/{digest}", "blob", creds)
        if not (resp.status >= 400 and self._head_cannot_tell(resp)):
            await self._raise_for(resp, f"blob {digest}")
            resp.release()
            return resp.content_length
        resp.release()
        resp = await self.request("GET", repo, f"blobs/{digest}", "blob", creds, {"Range": "bytes=0-0"})
        await self._raise_for(resp, f"blob {digest}")
        resp.close()  # the body is not wanted: a 200 would be the whole blob
        return _full_size(resp)

    async def open_blob(self, repo: str, digest: str, creds: Credentials | None) -> aiohttp.ClientResponse:
        """A 200 response whose body the caller streams and then releases."""
        resp = await self.request("GET", repo, f"blobs/{digest}", "blob", creds)
        await self._raise_for(resp, f"blob {digest}")
        if resp.status != 200:
            resp.release()
            raise UpstreamError(self.name, 502, f"blob {digest}: unexpected status {resp.status}")
        return resp

    async def get_tags(self, repo: str, query: str, creds: Credentials | None) -> tuple[bytes, str | None, str]:
        """The tag list body, its `Link` header (pagination) and the URL that answered (after
        redirects: a `Link` is relative to it)."""
        path = f"tags/list?{query}" if query else "tags/list"
        resp = await self.request("GET", repo, path, "tags", creds)
        await self._raise_for(resp, f"tags of {repo}")
        async with resp:
            body = await self._read_small(resp, f"tags of {repo}")
        return body, resp.headers.get("Link"), str(resp.url)

    async def login(self, creds: Credentials, repos: list[str]) -> None:
        """Check `creds` the way upstream would: its realm must grant them a token.

        Raises UpstreamError (401 with upstream's message) when they are refused.
        A token granted for `repos` is kept, so the pulls that follow need no second exchange.
        An upstream whose `/v2/` asks for nothing, or is answered by another origin it
        redirects to (credentials are never shown there), has nothing to check them against.
        """
        resp = await self._exchange("GET", f"{self.url}/v2/", "base", None, {}, answer_challenges=False)
        resp.release()
        if resp.status != 401 or origin(str(resp.url)) != self.origin:
            return
        challenge = parse_challenge(resp.headers.getall("WWW-Authenticate", []))
        if challenge is None:
            return
        if challenge.scheme == "basic":
            resp = await self._send("GET", str(resp.url), "base", {"Authorization": creds.basic})
            resp.release()
            if resp.status in (401, 403):
                raise UpstreamError(self.name, resp.status, "credentials refused")
            return
        scopes = " ".join(f"repository:{r}:pull" for r in repos)
        params = {k: v for k, v in challenge.params.items() if k != "scope"} | ({"scope": scopes} if scopes else {})
        token = await self._fetch_token(Challenge("bearer", params), TokenKey(self.name, self.origin, scopes, creds.fingerprint), creds)
        for repo in repos:
            self._tokens.put(TokenKey(self.name, self.origin, f"repository:{repo}:pull", creds.fingerprint), token, None)

    async def get_referrers(self, repo: str, digest: str, query: str, creds: Credentials | None) -> tuple[bytes, str]:
        """The referrers index of `digest` (OCI 1.1) and upstream's `OCI-Filters-Applied` header.

        `query` is already encoded (`artifactType=…` or empty). Raises UpstreamError, 404
        included: that is how an upstream without the referrers API answers.
        """
        path = f"referrers/{digest}?{query}" if query else f"referrers/{digest}"
        resp = await self.request("GET", repo, path, "referrers", creds,
                                  {"Accept": "application/vnd.oci.image.index.v1+json"})
        await self._raise_for(resp, f"referrers of {repo}@{digest}")
        async with resp:
            body = await self._read_small(resp, f"referrers of {repo}@{digest}")
        return body, resp.headers.get("OCI-Filters-Applied", "")


def _resolve(base: str, location: str) -> str | None:
    """`location` resolved against the URL that sent it (RFC 3986 §5: `/x`, `../x`, `//host/x`);
    None unless the result is an http(s) URL with a host."""
    try:
        parts = urlsplit(urljoin(base, location.strip()))
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.port == 0:
            return None
    except ValueError:  # an unbalanced IPv6 bracket, a port that is not a number
        return None
    return parts._replace(fragment="").geturl()


def _media_type(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def _full_size(resp: aiohttp.ClientResponse) -> int | None:
    """The whole resource's size: from `Content-Range: bytes 0-0/<size>` of a 206, else Content-Length."""
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return resp.content_length


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
