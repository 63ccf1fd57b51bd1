"""Thin handlers: parse and validate, route to an upstream, call a service, hand its answer to `mirror.responses`."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from aiohttp.typedefs import Handler
from mirror.errors import RegistryError, unsupported
from mirror.hotpath import HOT
from mirror.metrics import Metrics
from mirror.proxy.access import Principal, principal_for
from mirror.proxy.blobs import BlobService
from mirror.proxy.catalog import CatalogService
from mirror.proxy.manifests import ManifestService
from mirror.proxy.referrers import ReferrersService
from mirror.proxy.tags import TagListService, mirror_link, parse_page
from mirror.proxy.token_realm import Grant, TokenService, challenge, client_credentials
from mirror.upstream.credentials import Credentials
from mirror.upstream.client import Upstream
from mirror.reference import ManifestRef, parse_digest, parse_reference
from mirror.responses import blobs as blob_responses, documents
from mirror.routing import Router
from mirror.requestinfo import KIND, RESULT, client_scheme

READ_METHODS = ("GET", "HEAD")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


@dataclass
class Services:
    router: Router
    manifests: ManifestService
    blobs: BlobService
    tags: TagListService
    referrers: ReferrersService
    catalog: CatalogService
    tokens: TokenService
    metrics: Metrics
    public_url: str = ""
    ready: bool = False


SERVICES = web.AppKey("services", Services)


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _read_only(request: web.Request) -> None:
    if request.method not in READ_METHODS:
        raise unsupported(f"{request.method} is not supported: this registry is a read-only mirror")


def _client(request: web.Request) -> Credentials | None:
    return client_credentials(_services(request).tokens, request.headers.get("Authorization"))


def _target(request: web.Request) -> tuple[Upstream, str, Principal]:
    """The upstream and repository a `/v2/<name>/...` request is for, and who asks."""
    svc = _services(request)
    upstream, repo = svc.router.route(request.match_info["name"], request.query.get("ns"))
    return upstream, repo, principal_for(_client(request), upstream)


async def base(request: web.Request) -> web.Response:
    """The version check; like Docker Hub it challenges clients that bring no credentials."""
    request[KIND] = "base"
    _read_only(request)
    if not request.headers.get("Authorization"):
        raise RegistryError("UNAUTHORIZED", 401, "authentication required (anonymous clients: any token will do)")
    _client(request)
    return web.json_response({}, headers=API_VERSION)


async def manifest(request: web.Request) -> web.StreamResponse:
    request[KIND] = "manifest"
    _read_only(request)
    upstream, repo, principal = _target(request)
    ref = _manifest_reference(request.match_info["reference"])
    answer = await _services(request).manifests.get(upstream, repo, ref, request.headers.getall("Accept", []), principal)
    request[RESULT] = answer.result
    _count_hit(request, upstream, repo)
    response = documents.manifest(request, answer)
    if (again := answer.again) is not None and (hot := request.app.get(HOT)) is not None:
        stats = _services(request).manifests.metadata.stats

        def hit_again(now: float) -> bool:  # the same hit, answered by the connection
            if not again(now):
                return False
            stats.count_hit(upstream.name, repo)
            return True

        hot.remember(request, response, registry_headers(request), hit_again)
    return response


def _manifest_reference(reference: str) -> ManifestRef:
    """A tag or digest; a tag no registry could hold is unknown (404), as distribution answers
    (the OCI conformance suite asks for `.INVALID_MANIFEST_NAME` and expects 404)."""
    try:
        return parse_reference(reference)
    except RegistryError as err:
        if err.code != "TAG_INVALID":
            raise
        raise RegistryError("MANIFEST_UNKNOWN", 404, err.message) from None


async def blob(request: web.Request) -> web.StreamResponse:
    request[KIND] = "blob"
    _read_only(request)
    upstream, repo, principal = _target(request)
    digest = parse_digest(request.match_info["digest"])
    # one range at most: S3-compatible stores answer a multi-range GET with the whole object
    redirectable = request.method == "GET" and "," not in request.headers.get("Range", "")
    answer = await _services(request).blobs.get(upstream, repo, digest, principal, head=request.method == "HEAD",
                                                redirectable=redirectable)
    request[RESULT] = answer.result
    response = await blob_responses.respond(request, answer)
    _count_hit(request, upstream, repo)
    return response


def _count_hit(request: web.Request, upstream: Upstream, repo: str) -> None:
    if request.get(RESULT) in ("hit", "coalesced"):
        _services(request).manifests.metadata.stats.count_hit(upstream.name, repo)


async def tags(request: web.Request) -> web.Response:
    request[KIND] = "tags"
    _read_only(request)
    upstream, repo, principal = _target(request)
    page = parse_page(request.query)
    body, following, result = await _services(request).tags.get(upstream, repo, page, principal.upstream)
    request[RESULT] = result
    link = mirror_link(request.match_info["name"], request.query.get("ns"), following) if following else None
    return documents.tag_list(body, link)


async def referrers(request: web.Request) -> web.Response:
    request[KIND] = "referrers"
    _read_only(request)
    upstream, repo, principal = _target(request)
    digest = parse_digest(request.match_info["digest"])
    answer = await _services(request).referrers.get(upstream, repo, digest, request.query.get("artifactType"), principal)
    request[RESULT] = answer.result
    return documents.referrers(answer)


async def catalog(request: web.Request) -> web.Response:
    """The cached repositories this client may read (see mirror.proxy.catalog)."""
    request[KIND] = "catalog"
    _read_only(request)
    svc = _services(request)
    answer = await svc.catalog.list(principal_for(_client(request), svc.router.default), request.query)
    return documents.catalog(answer)


async def other_v2(request: web.Request) -> web.Response:
    """Uploads, deletes and unknown endpoints under /v2/."""
    request[KIND] = "other"
    _read_only(request)
    raise RegistryError("NAME_UNKNOWN", 404, f"no such endpoint: {request.path[:200]}")


async def token(request: web.Request) -> web.Response:
    """The mirror's token realm: `GET` with Basic or no credentials, or the OAuth2 `POST` form."""
    svc = _services(request)
    offline = request.query.get("offline_token") == "true"
    scopes = request.query.getall("scope", [])
    if request.method == "POST":
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        scopes = str(form.get("scope", "")).split()
        offline = form.get("access_type") == "offline"
        if grant_type == "refresh_token":
            grant = svc.tokens.refresh(str(form.get("refresh_token", "")))
            if grant is None:
                raise RegistryError("UNAUTHORIZED", 401, "unknown or expired refresh token: log in again")
            return web.json_response(svc.tokens.issue(grant, offline))
        if grant_type != "password":
            raise RegistryError("UNSUPPORTED", 400, f"unsupported grant_type {grant_type[:40]!r}: use password or refresh_token")
        creds: Credentials | None = svc.tokens.fingerprints.credentials(str(form.get("username", "")), str(form.get("password", "")))
    elif request.method == "GET":
        creds = client_credentials(svc.tokens, request.headers.get("Authorization"))
    else:
        raise RegistryError("UNSUPPORTED", 405, f"{request.method} is not supported here")
    if creds is not None:
        upstream, repos = _scope_target(svc, scopes, request.query.get("ns"))
        await svc.tokens.login(upstream, creds, repos)
    return web.json_response(svc.tokens.issue(Grant(creds), offline))


def _scope_target(svc: Services, scopes: list[str], ns: str | None) -> tuple[Upstream, list[str]]:
    """The upstream that checks a login, and the repositories asked for there."""
    routed: list[tuple[Upstream, str]] = []
    for scope in (s for item in scopes for s in item.split()):
        kind, _, rest = scope.partition(":")
        name, _, _actions = rest.rpartition(":")
        if kind.split("(")[0] == "repository" and name:
            try:
                routed.append(svc.router.route(name, ns))
            except RegistryError:
                continue  # a scope for a name we cannot serve grants nothing; the token still works
    if routed:
        upstream = routed[0][0]
        return upstream, [repo for up, repo in routed if up is upstream]
    return (svc.router.route_ns(ns) if ns else svc.router.default), []


@web.middleware
async def challenge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every 401 tells the client where to log in: this mirror's token realm."""
    try:
        return await handler(request)
    except RegistryError as err:
        if err.status == 401 and "WWW-Authenticate" not in err.headers:
            svc = _services(request)
            base_url = svc.public_url or f"{client_scheme(request)}://{request.host}"
            name = request.match_info.get("name")
            err.headers["WWW-Authenticate"] = challenge(base_url.rstrip("/"), request.query.get("ns"), name)
        raise


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready: started and not shutting down, data directory writable, database open."""
    svc = _services(request)
    if not svc.ready:
        return web.Response(status=503, text="not ready: starting or shutting down\n")
    problems = []
    store = svc.blobs.store
    if not await asyncio.to_thread(store.writable):
        problems.append(f"content store {store.location} is not writable")
    if not await svc.manifests.metadata.ping():
        problems.append("database is not open")
    if problems:
        return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(_services(request).metrics.exposition())
    return web.Response(body=body, headers={"Content-Type": content_type})


def registry_headers(request: web.Request) -> dict[str, str]:
    """Registry headers, and `X-Mirror-Cache` saying how the answer was got (hit, miss, …)."""
    if RESULT in request:
        return {**API_VERSION, "X-Mirror-Cache": request[RESULT]}
    return API_VERSION


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """`registry_headers` on every answer under /v2."""
    if request.path.startswith("/v2"):
        response.headers.update(registry_headers(request))


def setup(app: web.Application) -> None:
    r = app.router
    r.add_route("*", "/v2/", base)
    r.add_route("*", r"/v2/{name:.+}/manifests/{reference}", manifest)
    r.add_route("*", r"/v2/{name:.+}/blobs/{digest:[^/]+}", blob)
    r.add_route("*", r"/v2/{name:.+}/tags/list", tags)
    r.add_route("*", r"/v2/{name:.+}/referrers/{digest:[^/]+}", referrers)
    r.add_route("*", "/v2/_catalog", catalog)
    r.add_route("*", r"/v2/{tail:.*}", other_v2)
    r.add_route("*", "/token", token)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    app.on_response_prepare.append(add_api_version)
