"""One upstream registry: its operations (manifests, blobs, tags, referrers, login) over pooled
HTTP, each request passing the rate-limit gate (`ratelimit`), following redirects hop by hop
(`redirects`), and on each hop answering the auth challenge of that hop's origin
(`authorizer`, which also binds credentials to trusted token realms).

Timeouts bound connecting and every read (first byte and a stalled body alike),
so a hung upstream becomes an `UpstreamError` the proxy can serve stale content
around, never a client that hangs with it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from mirror.config import UpstreamConfig
from mirror.errors import NeedsPrimary
from mirror.metrics import Metrics
from mirror.upstream import redirects
from mirror.upstream.authorizer import Authorizer, RealmBinding, TokenCache, TokenKey, TokenReply
from mirror.upstream.challenges import parse_challenge
from mirror.upstream.credentials import Credentials, Fingerprinter, fingerprint
from mirror.upstream.errors import UpstreamError
from mirror.upstream.ratelimit import RateLimits
from mirror.upstream.urls import api_scope, origin, shown

MANIFEST_MAX_BYTES = 4 << 20
TOKEN_MAX_BYTES = 1 << 20
# A HEAD that tells nothing about the manifest: the method is not supported (405, 501).
# Storage a registry redirected to may refuse a HEAD in any 4xx way (S3: 403 for a URL signed for GET).
HEAD_NOT_SUPPORTED = frozenset({405, 501})
READ_BUFFER = 1 << 20  # large reads of blob bodies: few wake-ups, few writes


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


class Upstream:
    def __init__(
        self, config: UpstreamConfig, tokens: TokenCache, limits: RateLimits, metrics: Metrics,
        fingerprints: Fingerprinter, local_only: bool = False,
    ) -> None:
        self.config = config
        self.local_only = local_only  # in a secondary worker: upstream requests go to the primary
        self.name = config.name
        self.url = config.url
        self.origin = origin(config.url)
        self.service_account = (
            fingerprints.credentials(config.username, config.password)
            if config.username and config.password is not None else None
        )
        self.realms = RealmBinding(config.name, config.url, config.token_realms)
        self._authorizer = Authorizer(self.realms, tokens, limits, self._fetch_token)
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
        return origin(url) == self.origin or api_scope(url) is not None

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
        """Send to `/v2/<repo>/<path>` as `creds`: through the rate-limit gate, following
        redirects, each hop answering its own origin's challenge (see `_hop`).

        A principal that upstream rate-limited sends no GET until its Retry-After has passed.
        Raises UpstreamError when upstream cannot be reached, a token is refused or rate-limited,
        a realm is refused credentials, or the redirects loop or go on too long.
        """
        who = fingerprint(creds)
        wait = self._limits.blocked_for(self.name, who) if method == "GET" else 0.0
        if wait:
            raise UpstreamError(self.name, 429, f"rate-limited by the upstream; retry in {wait:.0f}s", str(int(wait) + 1))

        async def hop(url: str, scope: str) -> aiohttp.ClientResponse:
            return await self._hop(method, url, kind, creds, headers or {}, scope)

        resp = await redirects.follow(self.name, f"{self.url}/v2/{repo}/{path}", hop)
        if resp.status == 429:
            self._limits.block(self.name, who, resp.headers.get("Retry-After"))
        return resp

    async def _hop(
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
        if authorization := self._authorizer.cached(key):
            hdrs["Authorization"] = authorization
        resp = await self._send(method, url, kind, hdrs)
        if resp.status != 401:
            return resp
        own = creds if key.origin == self.origin else None
        authorization = await self._authorizer.answer(resp.headers.getall("WWW-Authenticate", []), key, own)
        if not authorization:
            return resp
        resp.release()
        hdrs["Authorization"] = authorization
        return await self._send(method, url, kind, hdrs)

    async def _fetch_token(self, url: str, headers: Mapping[str, str]) -> TokenReply:
        """GET a token realm's URL (the authorizer's transport): status, headers, small body."""
        resp = await self._send("GET", url, "token", headers)
        async with resp:
            body = await self._read_small(resp, f"the answer of token realm {shown(url)}", TOKEN_MAX_BYTES)
        return TokenReply(resp.status, resp.headers, body)

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

    async def _read_small(self, resp: aiohttp.ClientResponse, what: str, limit: int = MANIFEST_MAX_BYTES) -> bytes:
        """A whole JSON body (manifest, tag list, token), refusing one larger than `limit` bytes."""
        if (resp.content_length or 0) > limit:
            raise UpstreamError(self.name, 502, f"{what} is larger than {limit} bytes")
        body = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise UpstreamError(self.name, 502, f"{what} is larger than {limit} bytes")
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

        Raises UpstreamError (401 with upstream's message) when they are refused, 502 when the
        realm is not one credentials may go to. A token granted for `repos` is kept, so the
        pulls that follow need no second exchange. An upstream whose `/v2/` asks for nothing, or
        is answered by another origin it redirects to (credentials are never shown there), has
        nothing to check them against.
        """
        async def hop(url: str, scope: str) -> aiohttp.ClientResponse:
            return await self._send("GET", url, "base", {})

        resp = await redirects.follow(self.name, f"{self.url}/v2/", hop)
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
        await self._authorizer.login(challenge, self.origin, repos, creds)

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


def _media_type(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def _full_size(resp: aiohttp.ClientResponse) -> int | None:
    """The whole resource's size: from `Content-Range: bytes 0-0/<size>` of a 206, else Content-Length."""
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return resp.content_length
