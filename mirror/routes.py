"""Thin handlers: parse and validate, route to an upstream, call a service, shape the response."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from mirror.errors import RegistryError, unsupported
from mirror.metrics import Metrics
from mirror.proxy.blobs import BlobService
from mirror.proxy.manifests import ManifestService
from mirror.proxy.tags import TagListService
from mirror.reference import parse_digest, parse_reference
from mirror.routing import Router
from mirror.requestinfo import KIND, RESULT

READ_METHODS = ("GET", "HEAD")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


@dataclass
class Services:
    router: Router
    manifests: ManifestService
    blobs: BlobService
    tags: TagListService
    metrics: Metrics
    ready: bool = False


SERVICES = web.AppKey("services", Services)


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _read_only(request: web.Request) -> None:
    if request.method not in READ_METHODS:
        raise unsupported(f"{request.method} is not supported: this registry is a read-only mirror")


async def base(request: web.Request) -> web.Response:
    request[KIND] = "base"
    _read_only(request)
    return web.json_response({}, headers=API_VERSION)


async def manifest(request: web.Request) -> web.StreamResponse:
    request[KIND] = "manifest"
    _read_only(request)
    svc = _services(request)
    upstream, repo = svc.router.route(request.match_info["name"], request.query.get("ns"))
    ref = parse_reference(request.match_info["reference"])
    answer = await svc.manifests.get(upstream, repo, ref, request.headers.getall("Accept", []))
    request[RESULT] = answer.result
    headers = {
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": answer.digest,
        "ETag": f'"{answer.digest}"',
    }
    if f'"{answer.digest}"' in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=answer.body, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    request[KIND] = "blob"
    _read_only(request)
    svc = _services(request)
    upstream, repo = svc.router.route(request.match_info["name"], request.query.get("ns"))
    digest = parse_digest(request.match_info["digest"])
    return await svc.blobs.serve(request, upstream, repo, digest)


async def tags(request: web.Request) -> web.Response:
    request[KIND] = "tags"
    _read_only(request)
    svc = _services(request)
    upstream, repo = svc.router.route(request.match_info["name"], request.query.get("ns"))
    query = "&".join(f"{k}={v}" for k, v in request.query.items() if k in ("n", "last"))
    body, link, result = await svc.tags.get(upstream, repo, query)
    request[RESULT] = result
    headers = {"Link": link} if link else {}
    return web.Response(body=body, content_type="application/json", headers=headers)


async def other_v2(request: web.Request) -> web.Response:
    """Uploads, deletes and unknown endpoints under /v2/."""
    request[KIND] = "other"
    _read_only(request)
    raise RegistryError("NAME_UNKNOWN", 404, f"no such endpoint: {request.path[:200]}")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if not _services(request).ready:
        return web.Response(status=503, text="not ready\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(_services(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_VERSION)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_route("*", "/v2/", base)
    r.add_route("*", r"/v2/{name:.+}/manifests/{reference}", manifest)
    r.add_route("*", r"/v2/{name:.+}/blobs/{digest:[^/]+}", blob)
    r.add_route("*", r"/v2/{name:.+}/tags/list", tags)
    r.add_route("*", r"/v2/{tail:.*}", other_v2)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    app.on_response_prepare.append(add_api_version)
