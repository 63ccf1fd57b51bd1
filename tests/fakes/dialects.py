"""Upstream dialects: the fake registry dressed as the real registries users mirror.

Each dialect is a few aiohttp apps on loopback ports (127.0.0.1 only), built around a
`FakeRegistry` that holds the content, so tests add images and count requests as usual:

- `docker_hub`: the token realm on a host of its own (auth.docker.io), blob GETs redirected to
  a CDN host (`FakeRegistry.redirect_blobs`).
- `k8s`: registry.k8s.io's front, answering every request with a 307 to a regional registry
  (Artifact Registry) that has its own realm and bounces manifests and blobs once more with a
  relative `Location` on its own origin.
- `s3`: a registry keeping content on presigned storage (GitLab, Harbor, distribution's redirect
  middleware): manifest and blob GETs and HEADs are answered 302 to a URL signed for GET only;
  the storage refuses HEAD (403), refuses any `Authorization` (400) and sends
  `Content-Type: binary/octet-stream`.
- `TokenRealm.rate_limited`: a realm answering 429 with `Retry-After`.

Apps run in the test's event loop (`Servers()`, unit tests) or each in its own thread
(`Servers(threaded=True)`, for real clients in integration tests):

    dialect = await k8s(Servers())
    image = dialect.registry.add_image(dialect.content_repo("pause"), "3.9", 1)
    ... point the mirror's upstream at dialect.url, pull "pause:3.9" ...
    await dialect.close()
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, MultiDict

from tests.fakes.registry import FakeRegistry, Repository
from tests.fakes.threaded import ThreadedServer

K8S_PREFIX = "k8s-artifacts-prod/images/"  # where registry.k8s.io's images live in its regional registries


# Docker Hub's realm is on a host of its own (auth.docker.io): here another loopback address.
REALM_HOST = "127.0.0.2"

class Seen(NamedTuple):
    """One request a dialect server received."""

    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDict[str]


def _record(log: list[Seen], request: web.Request) -> None:
    log.append(Seen(request.method, request.path, MultiDict(request.query), request.headers.copy()))


class Servers:
    """Serves aiohttp apps on free loopback ports: in the running event loop, or (threaded)
    each from its own thread and loop, so they keep answering while a test blocks on a subprocess."""

    def __init__(self, threaded: bool = False) -> None:
        self.threaded = threaded
        self._runners: list[web.AppRunner] = []
        self._threads: list[ThreadedServer] = []

    async def serve(self, app: web.Application, host: str = "127.0.0.1") -> str:
        """Start serving `app` on `host` (another loopback address is another host); its base
        URL, e.g. `http://127.0.0.1:41234`."""
        if self.threaded:
            server = ThreadedServer()
            self._threads.append(server)
            return server.start(app, name="dialect", host=host)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, 0).start()
        return f"http://{host}:{runner.addresses[0][1]}"

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        for server in reversed(self._threads):
            server.stop()
        self._runners.clear()
        self._threads.clear()


class TokenRealm:
    """A token realm on a host of its own, issuing the tokens `registry` accepts (its `/token`).

    `realm` is the URL challenges name; `query` is kept in it (`…/token?account=x`), as some
    realms carry parameters of their own. With `rate_limited` on, it answers 429 with
    `Retry-After: retry_after` (no header when None). `requests` logs what it was asked.
    """

    def __init__(self, registry: FakeRegistry, path: str = "/token", query: str = "") -> None:
        self.registry = registry
        self.path = path
        self.query = query
        self.url: str | None = None
        self.rate_limited = False
        self.retry_after: str | None = "30"
        self.requests: list[Seen] = []

    @property
    def realm(self) -> str:
        assert self.url, "not served yet"
        return f"{self.url}{self.path}" + (f"?{self.query}" if self.query else "")

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.path, self._issue)
        return app

    async def _issue(self, request: web.Request) -> web.Response:
        _record(self.requests, request)
        if self.rate_limited:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.json_response({"details": "too many requests"}, status=429, headers=headers)
        return await self.registry._token(request)  # the registry's own issuer, served from here


class Redirector:
    """A front host that answers every request (any method, any path) with `status` to
    `location(request)`: by default the same path and query on `target`, with `prefix` put
    after `/v2/` (`/v2/pause/manifests/3.9` → `<target>/v2/<prefix>pause/manifests/3.9`).
    Tests may replace `location` (loops, odd `Location` forms). `requests` logs what it saw.
    """

    def __init__(self, target: str, prefix: str = "", status: int = 307) -> None:
        self.target = target
        self.prefix = prefix
        self.status = status
        self.location: Callable[[web.Request], str] = self._same_path_on_target
        self.requests: list[Seen] = []

    def _same_path_on_target(self, request: web.Request) -> str:
        path = request.path_qs
        if path.startswith("/v2/") and path != "/v2/":
            path = "/v2/" + self.prefix + path.removeprefix("/v2/")
        return self.target + path

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._redirect)
        return app

    async def _redirect(self, request: web.Request) -> web.Response:
        _record(self.requests, request)
        return web.Response(status=self.status, headers={"Location": self.location(request)})

    def count(self, method: str | None = None) -> int:
        return sum(1 for r in self.requests if method is None or r.method == method)


class RegionalRegistry(FakeRegistry):
    """The registry a front redirects to (an Artifact Registry region): a `FakeRegistry` with its
    own realm that bounces each manifest and blob request once more on its own origin, with a
    relative `Location` — `../blobs/<digest>?hop=1` for blobs, `/v2/<name>/manifests/<ref>?hop=1`
    for manifests — after checking the token (so both hops need it)."""

    def __init__(self) -> None:
        super().__init__()
        self.require_auth = True
        self.relative_hops = True

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._hop)  # inside the recording and auth middleware
        return app

    @web.middleware
    async def _hop(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = request.match_info.route.name
        if not self.relative_hops or "hop" in request.query or kind not in ("manifest", "blob"):
            return await handler(request)
        if kind == "blob":
            location = f"../blobs/{request.match_info['digest']}?hop=1"
        else:
            location = f"/v2/{request.match_info['name']}/manifests/{request.match_info['ref']}?hop=1"
        return web.Response(status=307, headers={"Location": location})


class PresignedStorage:
    """Object storage behind presigned URLs, as S3 behaves.

    `presign(data)` stores bytes and returns a URL signed for GET. Then:
    - GET with a valid signature → 200, `Content-Type: binary/octet-stream` (no
      `Docker-Content-Digest`), a single `Range` honoured (206);
    - HEAD → 403 (the signature covers the GET method only);
    - any request with `Authorization` → 400 `InvalidArgument` ("only one auth mechanism");
    - a missing or wrong signature → 403 `SignatureDoesNotMatch`; an unknown key → 404.
    Errors carry S3's XML body. Switches: `expired` makes every signature stale (403
    `AccessDenied`), `answer_html` makes every GET a 200 HTML page (a portal or a misconfigured
    bucket). `requests` logs what it saw.
    """

    def __init__(self) -> None:
        self.url: str | None = None
        self.objects: dict[str, bytes] = {}
        self.expired = False
        self.answer_html = False
        self.requests: list[Seen] = []
        self._secret = secrets.token_bytes(16)

    def presign(self, data: bytes) -> str:
        assert self.url, "not served yet"
        key = f"/bucket/docker/registry/v2/blobs/sha256/{hashlib.sha256(data).hexdigest()}/data"
        self.objects[key] = data
        return f"{self.url}{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=1200&X-Amz-Signature={self._sign(key)}"

    def _sign(self, key: str) -> str:
        return hmac.new(self._secret, f"GET\n{key}".encode(), hashlib.sha256).hexdigest()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{key:.*}", self._object)
        return app

    def count(self, method: str | None = None) -> int:
        return sum(1 for r in self.requests if method is None or r.method == method)

    def authorization_headers(self) -> list[str]:
        """Every `Authorization` value the storage was sent (the mirror must send none)."""
        return [r.headers["Authorization"] for r in self.requests if "Authorization" in r.headers]

    async def _object(self, request: web.Request) -> web.StreamResponse:
        _record(self.requests, request)
        if "Authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the "
                             "X-Amz-Algorithm query parameter, Signature query string parameter or "
                             "the Authorization header should be specified")
        signature = request.query.get("X-Amz-Signature", "")
        if request.method != "GET" or not hmac.compare_digest(signature, self._sign(request.path)):
            return _s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated "
                             "does not match the signature you provided.")
        if self.expired:
            return _s3_error(403, "AccessDenied", "Request has expired")
        if (data := self.objects.get(request.path)) is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        if self.answer_html:
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        status, headers = 200, {"Content-Type": "binary/octet-stream", "Accept-Ranges": "bytes"}
        if "Range" in request.headers:
            start, stop, _ = request.http_range.indices(len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            status, data = 206, data[start:stop]
        return web.Response(status=status, body=data, headers=headers)


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{secrets.token_hex(8)}</RequestId></Error>")
    return web.Response(status=status, text=body, content_type="application/xml")


class S3Registry(FakeRegistry):
    """A registry whose content lives on `storage`: each manifest or blob GET or HEAD it would
    answer 200 (after checking the token) is answered 302 to a presigned storage URL instead."""

    def __init__(self, storage: PresignedStorage) -> None:
        super().__init__()
        self.storage = storage
        self.require_auth = True

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._to_storage)  # inside the recording and auth middleware
        return app

    @web.middleware
    async def _to_storage(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = request.match_info.route.name
        if kind == "blob":
            name, digest = request.match_info["name"], request.match_info["digest"]
            data = self.repos.get(name, Repository()).blobs.get(digest)
            if data is not None:
                return web.Response(status=302, headers={"Location": self.storage.presign(data)})
        elif kind == "manifest":
            answer = await handler(request)  # the tag lookup and Accept check, then its bytes
            if answer.status == 200 and isinstance(answer, web.Response) and isinstance(answer.body, bytes):
                return web.Response(status=302, headers={"Location": self.storage.presign(answer.body)})
            return answer
        return await handler(request)


@dataclass
class Dialect:
    """A running upstream: point the mirror's upstream `url` at it, put content in `registry`
    under `content_repo(name)`, count requests on `registry` and the other servers."""

    name: str
    url: str
    registry: FakeRegistry
    servers: Servers
    realm: TokenRealm | None = None
    front: Redirector | None = None
    storage: PresignedStorage | None = None
    prefix: str = ""

    def content_repo(self, repo: str) -> str:
        """Where the content of `repo` (as clients name it) lives on `registry`."""
        return self.prefix + repo

    async def close(self) -> None:
        await self.servers.close()


async def _serve_registry(servers: Servers, registry: FakeRegistry) -> str:
    registry.url = await servers.serve(registry.app)
    return registry.url


async def docker_hub(servers: Servers) -> Dialect:
    """Docker Hub: token auth with the realm on another host, blob GETs redirected to a CDN host."""
    registry = FakeRegistry()
    registry.require_auth = True
    registry.redirect_blobs = True
    realm = TokenRealm(registry)
    realm.url = await servers.serve(realm.make_app(), host=REALM_HOST)
    registry.token_realm = realm.realm
    return Dialect("docker-hub", await _serve_registry(servers, registry), registry, servers, realm=realm)


async def k8s(servers: Servers, prefix: str = K8S_PREFIX, status: int = 307) -> Dialect:
    """registry.k8s.io: a front that redirects everything (`status`) to a regional registry with
    its own realm, where the images live under `prefix`."""
    regional = RegionalRegistry()
    front = Redirector(await _serve_registry(servers, regional), prefix, status)
    url = await servers.serve(front.make_app())
    return Dialect("k8s", url, regional, servers, front=front, prefix=prefix)


async def s3(servers: Servers) -> Dialect:
    """A registry on S3 (GitLab, Harbor): token auth, manifests and blobs on presigned storage."""
    storage = PresignedStorage()
    storage.url = await servers.serve(storage.make_app())
    registry = S3Registry(storage)
    return Dialect("s3", await _serve_registry(servers, registry), registry, servers, storage=storage)
