"""An in-process fake OCI registry + token server: the upstream of the mirror's unit tests.

It keeps content in memory, records every request, and has fault switches (plain attributes)
that tests flip at any time to make it fail, throttle, corrupt, stall or drop connections.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_IMAGE_TYPES = {  # kind → (manifest, config, layer) media types
    "schema2": (DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    "oci": (OCI_MANIFEST, "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip"),
}
_INDEX_TYPES = {"list": DOCKER_LIST, "oci-index": OCI_INDEX}
_STATUS_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}
RATELIMIT_WINDOW = 21600  # Docker Hub's window: 6 hours

Kind = Literal["manifest", "blob", "tags", "referrers", "base", "token", "cdn", "other"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Call(NamedTuple):
    """One request as the fake saw it, so tests can assert what the mirror sent upstream."""

    method: str
    path: str
    kind: Kind
    headers: CIMultiDict[str]
    repo: str | None
    query: str = ""  # as sent, still percent-encoded


@dataclass
class Repository:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest → (body, type)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    digest: str
    body: bytes
    media_type: str


@dataclass(frozen=True)
class Image(Manifest):
    config_digest: str
    config: bytes
    layer_digests: list[str]
    layers: list[bytes]
    platform: str


@dataclass(frozen=True)
class Token:
    """An issued bearer token: who asked, for what, and what they actually got."""

    value: str
    user: str | None
    service: str | None
    requested: tuple[str, ...]
    granted: frozenset[str]  # repository names with pull access
    expires_at: float


class Hold:
    """Blob GETs of one digest stopped after their first `after` body bytes until `release()`.

    Headers go out at once (a stream response sends them on prepare), so whoever fetches
    sees the response begin, then `after` bytes, then nothing until the test releases it.
    `arrived` counts the GETs that reached the hold (released or not).
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self.arrived = 0
        self._released = asyncio.Event()
        self._changed = asyncio.Condition()

    async def reached(self, count: int = 1) -> None:
        """Wait until `count` GETs have sent their first `after` bytes and stopped here."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.arrived >= count)

    def release(self) -> None:
        """Let every held GET, and every later one, send the rest."""
        self._released.set()

    async def _pass(self) -> None:
        async with self._changed:
            self.arrived += 1
            self._changed.notify_all()
        await self._released.wait()


def oci_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": {}}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class FakeRegistry:
    """Repositories in memory, served over HTTP by an aiohttp app, with switches for faults."""

    def __init__(self) -> None:
        self.repos: dict[str, Repository] = {}
        self.requests: list[Call] = []
        self.url: str | None = None
        # auth
        self.require_auth = False
        self.auth_scheme: Literal["bearer", "basic"] = "bearer"
        self.users: dict[str, str] = {}
        self.private: dict[str, set[str]] = {}  # repo → users allowed to pull it
        self.expires_in = 300
        self.clock: Callable[[], float] = time.monotonic  # tests replace it to expire tokens
        self.tokens: dict[str, Token] = {}
        self.token_realm: str | None = None  # the realm challenges name (None: this server's /token)
        # the WWW-Authenticate lines sent for the Bearer challenge it is given (None: that one line)
        self.www_authenticate: Callable[[str], list[str]] | None = None
        # CDN redirects
        self.redirect_blobs = False
        self.cdn_auth_headers: list[str | None] = []
        self._signatures: dict[str, tuple[str, str]] = {}  # sig → (repo, digest)
        # faults: tests flip these at any time
        self.fail_status: int | None = None  # every /v2/ request answers this status
        self.rate_limited = False  # manifest and blob GETs → 429 (HEADs are free, as on Hub)
        self.retry_after = 60
        self.ratelimit_headers: tuple[int, int] | None = None  # (limit, remaining) on GETs
        self.corrupt_blobs = False  # one byte flipped, same length
        self.stall: asyncio.Event | None = None  # blob bodies wait on it after the first chunk
        self.stall_before_headers = False  # every request waits while this is True
        self.omit_digest_header = False  # no Docker-Content-Digest on manifests
        self.manifest_content_type: str | None = None  # a CDN's generic type instead of the real one
        self.omit_content_length = False  # blob GET bodies sent chunked
        self.omit_head_content_length = False  # blob HEADs answered without Content-Length
        self.chunk_size = 64 * 1024
        self.chunk_delay = 0.0  # seconds between blob chunks: a slow, streaming upstream
        self.holds: dict[str, Hold] = {}  # digest → its blob GETs' gate (see `hold`)
        self.drop_connection = False  # blob GETs close the connection after half the body
        # tags/list pages with ?n=&last= as distribution does; the next page's Link, from (repo, last, n)
        self.tags_link: Callable[[str, str, int], str] = lambda repo, last, n: (
            f'<{URL.build(path=f"/v2/{repo}/tags/list", query={"last": last, "n": n})}>; rel="next"')
        self.referrers_api = True  # False: /referrers/ answers 404, as registries without OCI 1.1 do
        self.referrers_filter = True  # False: ?artifactType= is ignored (no OCI-Filters-Applied)
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    # ---- content -------------------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        self.repos.setdefault(repo, Repository()).blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, body: bytes, media_type: str, tag: str | None = None,
                     digest: str | None = None) -> str:
        """Store a manifest under its digest (`digest` when it is not the bytes' sha256, as for
        a signed schema1, whose digest covers its payload)."""
        digest = digest or digest_of(body)
        repository = self.repos.setdefault(repo, Repository())
        repository.manifests[digest] = (body, media_type)
        if tag is not None:
            repository.tags[tag] = digest
        return digest

    def add_image(self, repo: str, tag: str | None, layers: list[bytes] | int,
                  kind: Literal["schema2", "oci"] = "schema2",
                  platform: str = "linux/amd64") -> Image:
        """Store config, layers and a valid manifest; an int asks for that many random layers."""
        blobs = [os.urandom(4096) for _ in range(layers)] if isinstance(layers, int) else layers
        manifest_type, config_type, layer_type = _IMAGE_TYPES[kind]
        os_, arch = platform.split("/")[:2]
        config = json.dumps({"architecture": arch, "os": os_, "rootfs": {
            "type": "layers", "diff_ids": [digest_of(b) for b in blobs]}}).encode()
        config_digest = self.add_blob(repo, config)
        layer_digests = [self.add_blob(repo, b) for b in blobs]
        body = json.dumps({
            "schemaVersion": 2, "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": len(config), "digest": config_digest},
            "layers": [{"mediaType": layer_type, "size": len(b), "digest": d}
                       for b, d in zip(blobs, layer_digests)],
        }, indent=3).encode()
        digest = self.add_manifest(repo, body, manifest_type, tag)
        return Image(digest, body, manifest_type, config_digest, config, layer_digests, blobs,
                     platform)

    def add_index(self, repo: str, tag: str | None, images: list[Image],
                  kind: Literal["list", "oci-index"] = "list") -> Manifest:
        media_type = _INDEX_TYPES[kind]
        entries = []
        for image in images:
            os_, arch, *variant = image.platform.split("/")
            platform = {"architecture": arch, "os": os_} | ({"variant": variant[0]} if variant else {})
            entries.append({"mediaType": image.media_type, "size": len(image.body),
                            "digest": image.digest, "platform": platform})
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries},
                          indent=3).encode()
        return Manifest(self.add_manifest(repo, body, media_type, tag), body, media_type)

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        if digest not in self.repos[repo].manifests:
            raise KeyError(f"{repo} has no manifest {digest}")
        self.repos[repo].tags[tag] = digest

    def remove(self, repo: str, ref: str | None = None) -> None:
        """Delete a tag, content by digest (with the tags pointing at it) or the whole repo."""
        if ref is None:
            del self.repos[repo]
            return
        repository = self.repos[repo]
        if not ref.startswith("sha256:"):
            del repository.tags[ref]
            return
        repository.blobs.pop(ref, None)
        repository.manifests.pop(ref, None)
        repository.tags = {t: d for t, d in repository.tags.items() if d != ref}

    def hold(self, digest: str, after: int = 0) -> Hold:
        """Hold the body of every GET of `digest` after its first `after` bytes (headers are
        sent) until the returned Hold is released; `await hold.reached(n)` waits for n GETs."""
        self.holds[digest] = hold = Hold(after)
        return hold

    # ---- request log ---------------------------------------------------------------------

    def count(self, method: str | None = None, kind: Kind | None = None,
              repo: str | None = None) -> int:
        return sum(1 for c in self.requests if (method is None or c.method == method)
                   and (kind is None or c.kind == kind) and (repo is None or c.repo == repo))

    def reset_counts(self) -> None:
        self.requests.clear()
        self.cdn_auth_headers.clear()

    # ---- server --------------------------------------------------------------------------

    @property
    def app(self) -> web.Application:
        if self._app is None:
            self._app = self.make_app()
        return self._app

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v2/", self._base, name="base")
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest, name="manifest")
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob, name="blob")
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags, name="tags")
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers, name="referrers")
        app.router.add_get("/token", self._token, name="token")
        app.router.add_get("/cdn/{digest}", self._cdn, name="cdn")
        app.on_response_prepare.append(self._api_version_header)
        return app

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on a free loopback port (HTTPS with `ssl_context`); handlers are cancelled when
        the client goes away."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        for hold in self.holds.values():
            hold.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- HTTP ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record, then apply the faults and auth every /v2/ endpoint shares, in that order."""
        kind: Kind = request.match_info.route.name or "other"  # type: ignore[assignment]
        name = request.match_info.get("name")
        self.requests.append(Call(request.method, request.path, kind, request.headers.copy(), name,
                                  request.rel_url.raw_query_string))
        while self.stall_before_headers:
            await asyncio.sleep(0.01)
        if request.path.startswith("/v2/"):
            if self.fail_status is not None:
                code = _STATUS_CODES.get(self.fail_status, "UNKNOWN")
                return oci_error(self.fail_status, code, "injected failure")
            if (denied := self._check_auth(request, name)) is not None:
                return denied
            if self.rate_limited and request.method == "GET" and kind in ("manifest", "blob"):
                return oci_error(429, "TOOMANYREQUESTS", "rate limit exceeded",
                                 **{"Retry-After": str(self.retry_after)},
                                 **self._ratelimit(request, 100, 0))
        return await handler(request)

    async def _api_version_header(self, request: web.Request, response: web.StreamResponse
                                  ) -> None:
        if request.path.startswith("/v2/"):
            response.headers["Docker-Distribution-API-Version"] = "registry/2.0"

    def _check_auth(self, request: web.Request, name: str | None) -> web.Response | None:
        """401 unless the credentials may pull `name` (a valid token without scope is not enough)."""
        if not self.require_auth and name not in self.private:
            return None
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if self.auth_scheme == "basic":
            user = self._basic_user(credential) if scheme.lower() == "basic" else None
            if user is not None and (name not in self.private or user in self.private[name]):
                return None
            return oci_error(401, "UNAUTHORIZED", "authentication required",
                             **{"WWW-Authenticate": 'Basic realm="fake"'})
        token = self.tokens.get(credential) if scheme.lower() == "bearer" else None
        if token is not None and token.expires_at <= self.clock():
            token = None  # expired: the client must come back with a new one
        if token is not None and (name is None or name in token.granted):
            return None
        realm = self.token_realm or f"{request.scheme}://{request.host}/token"
        challenge = f'Bearer realm="{realm}",service="fake"'
        if name is not None:
            challenge += f',scope="repository:{name}:pull"'
            if token is not None:
                challenge += ',error="insufficient_scope"'
        denied = oci_error(401, "UNAUTHORIZED", "authentication required")
        for line in self.www_authenticate(challenge) if self.www_authenticate else [challenge]:
            denied.headers.add("WWW-Authenticate", line)
        return denied

    def _basic_user(self, credential: str) -> str | None:
        """The user whose Basic credentials these are, or None if they are absent or wrong."""
        try:
            user, _, password = base64.b64decode(credential).decode().partition(":")
        except ValueError:
            return None
        return user if user in self.users and self.users[user] == password else None

    def _ratelimit(self, request: web.Request, limit: int, remaining: int) -> dict[str, str]:
        return {"ratelimit-limit": f"{limit};w={RATELIMIT_WINDOW}",
                "ratelimit-remaining": f"{remaining};w={RATELIMIT_WINDOW}",
                "docker-ratelimit-source": request.remote or "127.0.0.1"}

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _token(self, request: web.Request) -> web.Response:
        """Grant pull on each requested public repo, and on private ones the user may pull."""
        user = None
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            if (user := self._basic_user(credential)) is None:
                return web.json_response({"details": "incorrect username or password"}, status=401)
        requested = tuple(request.query.getall("scope", []))
        granted = set()
        for scope in (s for param in requested for s in param.split()):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and "pull" in actions.split(",") and (
                    name not in self.private or user in self.private[name]):
                granted.add(name)
        value = secrets.token_urlsafe(16)
        self.tokens[value] = Token(value, user, request.query.get("service"), requested,
                                   frozenset(granted), self.clock() + self.expires_in)
        return web.json_response({
            "token": value, "access_token": value, "expires_in": self.expires_in,
            "issued_at": datetime.now(timezone.utc).isoformat()})

    async def _manifest(self, request: web.Request) -> web.Response:
        name, ref = request.match_info["name"], request.match_info["ref"]
        if (repository := self.repos.get(name)) is None:
            return oci_error(404, "NAME_UNKNOWN", f"repository {name} not known")
        digest = ref if ref.startswith("sha256:") else repository.tags.get(ref, "")
        if (entry := repository.manifests.get(digest)) is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"manifest {ref} not known")
        body, media_type = entry
        accepted = {t.split(";")[0].strip() for h in request.headers.getall("Accept", [])
                    for t in h.split(",")}
        if accepted and not accepted & {media_type, "*/*"}:
            return oci_error(404, "MANIFEST_UNKNOWN", f"manifest {ref} not in an accepted type")
        headers = {"Content-Type": self.manifest_content_type or media_type, "ETag": f'"{digest}"'}
        if not self.omit_digest_header:
            headers["Docker-Content-Digest"] = digest
        if self.ratelimit_headers is not None and request.method == "GET":
            headers |= self._ratelimit(request, *self.ratelimit_headers)
        return web.Response(body=body, headers=headers)

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if (repository := self.repos.get(name)) is None:
            return oci_error(404, "NAME_UNKNOWN", f"repository {name} not known")
        tags = sorted(t for t in repository.tags if t > request.query.get("last", ""))
        n = int(request.query.get("n", len(tags) or 1))
        headers = {"Link": self.tags_link(name, tags[n - 1], n)} if 0 < n < len(tags) else {}
        return web.json_response({"name": name, "tags": tags[:n]}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        """OCI 1.1: the manifests whose `subject` is the digest, as an image index."""
        name, digest = request.match_info["name"], request.match_info["digest"]
        if not self.referrers_api or (repository := self.repos.get(name)) is None:
            return oci_error(404, "NAME_UNKNOWN", f"repository {name} not known")
        wanted = request.query.get("artifactType") if self.referrers_filter else None
        found = []
        for ref_digest, (body, media_type) in repository.manifests.items():
            doc = json.loads(body)
            if (doc.get("subject") or {}).get("digest") != digest:
                continue
            kind = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            if wanted is None or kind == wanted:
                found.append({"mediaType": media_type, "digest": ref_digest, "size": len(body), "artifactType": kind,
                              **({"annotations": doc["annotations"]} if "annotations" in doc else {})})
        headers = {"OCI-Filters-Applied": "artifactType"} if wanted is not None else {}
        return web.json_response({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found},
                                 content_type=OCI_INDEX, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.match_info["name"], request.match_info["digest"]
        if (data := self.repos.get(name, Repository()).blobs.get(digest)) is None:
            return oci_error(404, "BLOB_UNKNOWN", f"blob {digest} not known")
        if self.redirect_blobs and request.method == "GET":
            sig = secrets.token_urlsafe(8)
            self._signatures[sig] = (name, digest)
            other = "localhost" if request.url.host != "localhost" else "127.0.0.1"
            location = request.url.with_host(other).with_path(f"/cdn/{digest}").with_query(sig=sig)
            raise web.HTTPTemporaryRedirect(location)
        return await self._send_blob(request, data, digest)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        """The storage a blob GET redirected to: it must never see the registry's credentials."""
        self.cdn_auth_headers.append(request.headers.get("Authorization"))
        repo, digest = self._signatures.get(request.query.get("sig", ""), ("", ""))
        if digest != request.match_info["digest"]:
            return web.Response(status=403, text="AccessDenied: bad signature")
        if (data := self.repos.get(repo, Repository()).blobs.get(digest)) is None:
            return web.Response(status=404, text="NoSuchKey")
        return await self._send_blob(request, data, digest)

    async def _send_blob(self, request: web.Request, data: bytes, digest: str
                         ) -> web.StreamResponse:
        """Stream `data` in chunks, with Range, the body faults (corrupt, stall, drop) and holds."""
        size = len(data)
        if self.corrupt_blobs and size:
            data = data[:size // 2] + bytes([data[size // 2] ^ 0xFF]) + data[size // 2 + 1:]
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest,
                   "ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
        response = web.StreamResponse(headers=headers)
        if "Range" in request.headers:
            try:
                start, stop, _ = request.http_range.indices(size)
            except ValueError:
                start, stop = size, size
            if start >= stop:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            data = data[start:stop]
        if (self.omit_content_length and request.method == "GET") or (
                self.omit_head_content_length and request.method == "HEAD"):
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        end = len(data) // 2 if self.drop_connection else len(data)
        hold = self.holds.get(digest)
        held_at = end if hold is None else min(hold.after, end)
        await self._write_body(response, data, 0, held_at)
        if hold is not None:
            await hold._pass()
        await self._write_body(response, data, held_at, end)
        if self.drop_connection and request.transport is not None:
            request.transport.close()  # close() flushes the half written; abort() might not
        return response

    async def _write_body(self, response: web.StreamResponse, data: bytes, start: int, end: int) -> None:
        """data[start:end] in chunks, with the stall after the body's first chunk and the chunk delay."""
        for offset in range(start, end, self.chunk_size):
            await response.write(data[offset:min(offset + self.chunk_size, end)])
            if offset == 0 and self.stall is not None:
                await self.stall.wait()
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
