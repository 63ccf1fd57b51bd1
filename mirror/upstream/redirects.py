"""Following an upstream's redirects, hop by hop.

registry.k8s.io sends every `/v2/` request to a regional registry; registries on S3 send
manifests and blobs to presigned storage URLs; Docker Hub sends blobs to a CDN. Each hop is
sent by the caller (with what that hop's own origin issued), so a credential or token never
follows a redirect to another host.
"""
from __future__ import annotations

from typing import Awaitable, Callable

import aiohttp

from mirror.upstream.errors import UpstreamError
from mirror.upstream.urls import api_scope, resolve, shown

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Hop = Callable[[str, str], Awaitable[aiohttp.ClientResponse]]
"""Send one request to the URL for the scope; returns the response, whatever its status."""


async def follow(upstream: str, url: str, hop: Hop) -> aiohttp.ClientResponse:
    """The final answer to a request for `url`, after at most MAX_REDIRECTS redirects.

    Every 301/302/303/307/308 is followed with the same method (the mirror only GETs and
    HEADs); a relative `Location` is resolved against the URL that sent it (RFC 9110 §10.2.2).
    Each hop is asked for the scope of the last registry API path on the way (a download path
    keeps the scope that led to it). A Location already visited is a loop; a loop, too many
    hops or an unusable Location raise UpstreamError (502).
    """
    visited, scope = {url}, ""
    for _ in range(MAX_REDIRECTS + 1):
        scope = api_scope(url) or scope
        resp = await hop(url, scope)
        location = resp.headers.get("Location")
        if resp.status not in REDIRECT_STATUSES or not location:
            return resp
        resp.release()
        target = resolve(url, location)
        if target is None:
            raise UpstreamError(upstream, 502, f"{shown(url)} redirected to an unusable location")
        if target in visited:
            raise UpstreamError(upstream, 502, f"redirect loop: {shown(url)} sent us back to {shown(target)}")
        visited.add(target)
        url = target
    resp.release()
    raise UpstreamError(upstream, 502, f"more than {MAX_REDIRECTS} redirects, the last to {shown(url)}")
