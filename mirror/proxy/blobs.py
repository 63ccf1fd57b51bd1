"""Blobs: hits are files sent with sendfile; misses join one shared upstream fetch.

Content present on disk but not yet linked to the requested repository is
confirmed with one upstream HEAD in that repository before it is served, so a
digest is never reachable through a repository upstream does not hold it in.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable

from aiohttp import web

from mirror.errors import RegistryError
from mirror.proxy.access import AccessPolicy, Principal
from mirror.proxy.inflight import Fetch, FetchFailed, Inflight
from mirror.storage.blobs import ContentStore
from mirror.storage.metadata import Metadata
from mirror.upstream.auth import Credentials
from mirror.upstream.client import Upstream, UpstreamError
from mirror.requestinfo import RESULT
from mirror.workers import follow

log = logging.getLogger("mirror.blobs")

_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_range(request: web.Request, size: int | None) -> tuple[int, int] | None:
    """The single byte range asked for, as [start, end); None for the whole blob."""
    header = request.headers.get("Range")
    if header is None or size is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or m.group(1) == m.group(2) == "":
        raise _range_error(f"malformed Range header {header[:100]!r}: expected bytes=START-END", size)
    first, last = m.group(1), m.group(2)
    if first == "":  # a suffix: the last N bytes
        start, stop = max(size - int(last), 0), size
        if int(last) == 0:
            start = size
    else:
        start, stop = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= stop:
        raise _range_error(f"range {header[:100]!r} is outside the blob's {size} bytes", size)
    return start, stop


def _range_error(message: str, size: int) -> RegistryError:
    return RegistryError("RANGE_INVALID", 416, message, headers={"Content-Range": f"bytes */{size}"})


class SentFile(web.FileResponse):
    """A sendfile response that may be sent early (by the metrics middleware) and then returned."""

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)


def _headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


class BlobService:
    def __init__(
        self, store: ContentStore, metadata: Metadata, inflight: Inflight, access: AccessPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.inflight = inflight
        self.access = access
        self.clock = clock

    async def serve(
        self, request: web.Request, upstream: Upstream, repo: str, digest: str, principal: Principal
    ) -> web.StreamResponse:
        head = request.method == "HEAD"
        fetch = self.inflight.join(digest)
        try:
            if fetch is None and (size := self.store.size(digest)) is not None:
                await self._allow(upstream, repo, digest, principal)
                await self._linked(upstream, repo, digest, principal)
                return self._hit(request, digest, size)
            if fetch is not None or not principal.fetches_as_itself:
                await self._allow(upstream, repo, digest, principal)
            if fetch is None and head:
                return await self._head_miss(request, upstream, repo, digest, principal)
            if fetch is not None:
                request[RESULT] = "coalesced"
                if (fetch.upstream, fetch.repo) != (upstream.name, repo):
                    await self._linked(upstream, repo, digest, principal)
                return await self._stream(request, fetch, head)
            request[RESULT] = "miss"
            fetch = self.inflight.start(upstream, repo, digest, principal.upstream, self._stored)
            # upstream's answer to our GET tells whether it lets this principal read
            await self.access.observe(upstream, repo, principal, fetch.wait_started())
            return await self._stream(request, fetch, head)
        except UpstreamError as exc:
            raise exc.to_registry_error("BLOB_UNKNOWN") from None
        except FetchFailed as exc:
            raise RegistryError("UNAVAILABLE", 503, str(exc)) from None
        finally:
            if fetch is not None:
                fetch.leave()

    async def _allow(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """The access check, probing with a HEAD of this very blob (which also proves the link)."""
        await self.access.ensure(upstream, repo, principal, lambda creds: self._confirm(upstream, repo, digest, creds))

    async def _linked(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """Make sure `repo` holds `digest` upstream before serving it through that repository."""
        if not await self.metadata.is_linked(upstream.name, repo, digest):
            await self._confirm(upstream, repo, digest, principal.upstream)

    async def _confirm(self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None) -> None:
        """One upstream HEAD: does `repo` really hold `digest`? Then link it."""
        await upstream.head_blob(repo, digest, creds)
        await self.metadata.link(upstream.name, repo, [digest])

    def _hit(self, request: web.Request, digest: str, size: int) -> web.StreamResponse:
        request[RESULT] = "hit"
        self.metadata.touch(digest, self.clock())
        parse_range(request, size)
        headers = _headers(digest)
        if f'"{digest}"' in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return SentFile(self.store.path(digest), headers=headers)

    async def _head_miss(
        self, request: web.Request, upstream: Upstream, repo: str, digest: str, principal: Principal
    ) -> web.StreamResponse:
        request[RESULT] = "miss"
        size = await self.access.observe(upstream, repo, principal, upstream.head_blob(repo, digest, principal.upstream))
        resp = web.StreamResponse(status=200, headers=_headers(digest))
        if size is not None:
            resp.content_length = size
        return resp

    async def _stored(self, fetch: Fetch) -> None:
        now = self.clock()
        await self.metadata.add_content(fetch.digest, fetch.written, None, "blob", now)
        await self.metadata.link(fetch.upstream, fetch.repo, [fetch.digest])

    async def _stream(self, request: web.Request, fetch: Fetch, head: bool) -> web.StreamResponse:
        """Send the blob from the growing file: headers once upstream answered, bytes as they land.

        Raises the UpstreamError of a fetch that upstream refused before sending anything.
        """
        await fetch.wait_started()
        rng = parse_range(request, fetch.size)
        resp = web.StreamResponse(status=206 if rng else 200, headers=_headers(fetch.digest))
        start, end = rng or (0, fetch.size)
        if rng:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{fetch.size}"
        if end is not None:
            resp.content_length = end - start
        try:
            if not head and end is not None and fetch.tmp_name and follow.wants_follow(request):
                await follow.send_progress(request, resp, fetch, start, end)
                await resp.write_eof()
                return resp
            await resp.prepare(request)
            if head:
                return resp
            await self._send(request, resp, fetch, start, end)
        except ConnectionError:
            return resp  # the client went away; the fetch goes on without it
        except FetchFailed as exc:
            log.warning("aborting %s %s: %s", request.method, request.path, exc)
            if request.transport is not None:
                request.transport.abort()
            request[RESULT] = "error"
            return resp
        await resp.write_eof()
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, fetch: Fetch, start: int,
                    end: int | None) -> None:
        """Bytes in the temp file go out with sendfile (no copy through Python), the rest by write.

        With no length known the body is chunked, which sendfile cannot frame: it is copied.
        """
        transport = request.transport
        if end is None or transport is None:
            async for span in fetch.spans(start, end):
                await resp.write(fetch.pread(span))
            return
        loop = asyncio.get_running_loop()
        with fetch.open_file() as file:
            async for span in fetch.spans(start, end):
                if span.data is None:
                    await loop.sendfile(transport, file, span.offset, span.count)
                else:
                    await resp.write(span.data)
