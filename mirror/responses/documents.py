"""Manifests, tag lists, referrers and the catalog as HTTP: small bodies sent whole."""
from __future__ import annotations

from aiohttp import web

from mirror.mediatypes import OCI_INDEX
from mirror.proxy.catalog import Catalog
from mirror.proxy.manifests import Answer
from mirror.proxy.referrers import Referrers


def manifest(request: web.Request, answer: Answer) -> web.Response:
    """A manifest with its media type and digest (also its ETag); 304 for an `If-None-Match`
    that names the digest (HEAD gets the GET's headers: aiohttp leaves the body out)."""
    etag = f'"{answer.digest}"'
    headers = {
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": answer.digest,
        "ETag": etag,
    }
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=answer.body, headers=headers)


def tag_list(body: bytes, link: str | None) -> web.Response:
    """A `tags/list` page (JSON), with the `Link` to the next one if there is one."""
    return _page(body, link)


def referrers(answer: Referrers) -> web.Response:
    """The referrers of a manifest, an OCI image index (OCI distribution spec 1.1, "Listing Referrers")."""
    headers = {"OCI-Filters-Applied": "artifactType"} if answer.filtered else {}
    return web.Response(body=answer.body, content_type=OCI_INDEX, headers=headers)


def catalog(answer: Catalog) -> web.Response:
    """A `_catalog` page (JSON), with the `Link` to the next one if there is one."""
    return _page(answer.body, answer.link)


def _page(body: bytes, link: str | None) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers={"Link": link} if link else {})
