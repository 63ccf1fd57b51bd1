"""Blobs: hits are files sent with sendfile; misses join one shared upstream fetch.

Content present on disk but not yet linked to the requested repository is
confirmed with one upstream HEAD in that repository before it is served, so a
digest is never reachable through a repository upstream does not hold it in.
Content stored as a manifest is confirmed the same way: the blob endpoint serves
only what upstream serves as a blob (distribution does not serve manifests there).

Every answer, from the cache or from upstream, has the ETag `"<digest>"` and honours
If-None-Match, If-Range and Range: one range (206), several (206 multipart/byteranges)
or none satisfiable (416), see `ranges`. Every answer has a Content-Length: when upstream
sends a blob without one, the size comes from the descriptors of the repository's cached
manifests, else from an upstream HEAD; only if neither knows it is the body chunked.
With several worker processes, a secondary follows the primary's temp file for a miss of
the whole blob or one range; several ranges of a miss come through the primary's socket
(they are a table of contents: small).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from typing import Awaitable, BinaryIO, Callable, NamedTuple

from aiohttp import web
from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.observe import client_left
from mirror.proxy import ranges, sending
from mirror.proxy.access import AccessPolicy, Principal
from mirror.proxy.inflight import Fetch, FetchFailed, Inflight
from mirror.proxy.ranges import ByteRange, Multipart
from mirror.storage.store import ContentStore
from mirror.storage.metadata import Metadata
from mirror.storage.sizes import descriptor_size
from mirror.upstream.credentials import Credentials
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError
from mirror.requestinfo import RESULT, from_secondary
from mirror.workers import follow

log = logging.getLogger("mirror.blobs")


def _headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


class Plan(NamedTuple):
    """An answer about a blob: status, headers, the body's length (None: not known, so
    chunked) and the ranges of the blob it carries in order, framed by `multipart` if several."""

    status: int
    headers: dict[str, str]
    length: int | None
    parts: tuple[ByteRange, ...]
    multipart: Multipart | None = None

    def response(self) -> web.StreamResponse:
        """The response without its body (a 304 is complete as it is)."""
        if self.status == 304:
            return web.Response(status=304, headers=self.headers)
        resp = web.StreamResponse(status=self.status, headers=self.headers)
        if self.length is not None:
            resp.content_length = self.length
        return resp

    async def send(self, resp: web.StreamResponse, send_range: Callable[[int, int], Awaitable[None]]) -> None:
        """The body: each range by `send_range(start, stop)`, after its multipart head."""
        for i, part in enumerate(self.parts):
            if self.multipart is not None:
                await resp.write(self.multipart.heads[i])
            await send_range(part.start, part.stop)
        if self.multipart is not None:
            await resp.write(self.multipart.tail)


def plan(request: web.Request, digest: str, size: int | None) -> Plan:
    """What to answer a GET or HEAD of a blob of `size` bytes (None: unknown) (RFC 9110 §13.2.2,
    §14, §15.3.7); raises RegistryError RANGE_INVALID (416) for an unsatisfiable or malformed Range."""
    headers = _headers(digest)
    try:
        selected = ranges.select(request, size, headers["ETag"])
    except ranges.RangeNotSatisfiable as exc:
        raise RegistryError("RANGE_INVALID", 416, str(exc), headers={"Content-Range": f"bytes */{size}"}) from None
    if selected.status == 304:
        return Plan(304, headers, None, ())
    if selected.status == 200:
        return Plan(200, headers, size, () if size is None else (ByteRange(0, size),))
    assert size is not None
    if len(selected.ranges) == 1:
        (only,) = selected.ranges
        headers["Content-Range"] = only.content_range(size)
        return Plan(206, headers, only.stop - only.start, selected.ranges)
    multipart = Multipart(selected.ranges, size)
    headers["Content-Type"] = multipart.content_type
    return Plan(206, headers, multipart.length, selected.ranges, multipart)


class SentFile(web.StreamResponse):
    """A stored blob sent as its plan says: ranges of the file by sendfile, multipart framing by write.

    It owns `file`, opened before the request's checks: eviction may unlink the blob meanwhile, and
    the open file is still sent whole. It may be sent early (by the metrics middleware) and then
    returned: preparing it again does nothing. A client that goes away is counted and raises
    ConnectionError, which aiohttp and the metrics middleware take as the end of the exchange.
    """

    def __init__(self, file: BinaryIO, answer: Plan) -> None:
        super().__init__(status=answer.status, headers=answer.headers)
        self.content_length = answer.length
        self._file = file
        self._plan = answer
        self._sent = False

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
        if self._sent:
            return self._payload_writer
        self._sent = True
        assert isinstance(request, web.Request)

        async def send_range(start: int, stop: int) -> None:
            if stop > start:
                await sending.send_file(request, self._file, start, stop - start)

        try:
            writer = await super().prepare(request)
            await self._plan.send(self, send_range)
            await self.write_eof()
            return writer
        except ConnectionError as exc:
            client_left(request, exc)
            raise
        finally:
            self._file.close()


def _hashes_to(file: BinaryIO, digest: str) -> bool:
    """Whether the whole of `file` hashes to `digest` (read with pread: its position is not touched)."""
    h = hashlib.sha256()
    fd, offset = file.fileno(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return "sha256:" + h.hexdigest() == digest


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
        # (upstream, repository, digest) of content stored as a manifest that upstream serves as a blob there
        self._served_as_blob: LRUCache[tuple[str, str, str], bool] = LRUCache(10_000)

    async def serve(
        self, request: web.Request, upstream: Upstream, repo: str, digest: str, principal: Principal
    ) -> web.StreamResponse:
        head = request.method == "HEAD"
        fetch = self.inflight.join(digest)
        # Held open from here on (no await before this): eviction may unlink the blob while the
        # checks below wait on the database or upstream, and an open file is still sent whole.
        file = self._open(digest) if fetch is None else None
        try:
            if file is not None:
                await self._allow(upstream, repo, digest, principal)
                await self._a_blob_there(upstream, repo, digest, principal, file)
                await self._linked(upstream, repo, digest, principal)
                hit = self._hit(request, digest, file)
                if isinstance(hit, SentFile):
                    file = None  # it sends the file, and closes it
                return hit
            if fetch is not None or not principal.fetches_as_itself:
                await self._allow(upstream, repo, digest, principal)
            if fetch is None:
                fetch = self.inflight.join(digest)  # another request may have started it meanwhile
            if fetch is None and head:
                return await self._head_miss(request, upstream, repo, digest, principal)
            if fetch is not None:
                request[RESULT] = "coalesced"
                if (fetch.upstream, fetch.repo) != (upstream.name, repo):
                    await self._linked(upstream, repo, digest, principal)
                return await self._stream(request, fetch, head)
            request[RESULT] = "miss"
            fetch = self.inflight.start(upstream, repo, digest, principal.upstream, self._stored,
                                        lambda: self._size_of(upstream, repo, digest, principal.upstream))
            # upstream's answer to our GET tells whether it lets this principal read
            await self.access.observe(upstream, repo, principal, fetch.wait_started())
            return await self._stream(request, fetch, head)
        except UpstreamError as exc:
            raise exc.to_registry_error("BLOB_UNKNOWN") from None
        except FetchFailed as exc:
            raise RegistryError("UNAVAILABLE", 503, str(exc)) from None
        finally:
            if file is not None:
                file.close()
            if fetch is not None:
                fetch.leave()

    def _open(self, digest: str) -> BinaryIO | None:
        """The stored blob, open for reading; None if it is not stored (or was just evicted)."""
        return self.store.open(digest)

    async def _allow(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """The access check, probing with a HEAD of this very blob (which also proves the link)."""
        await self.access.ensure(upstream, repo, principal, lambda creds: self._confirm(upstream, repo, digest, creds))

    async def _linked(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """Make sure `repo` holds `digest` upstream before serving it through that repository."""
        if not await self.metadata.links.contains(upstream.name, repo, digest):
            await self._confirm(upstream, repo, digest, principal.upstream)

    async def _confirm(self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None) -> None:
        """One upstream HEAD: does `repo` really hold `digest`? Then link it."""
        await upstream.head_blob(repo, digest, creds)
        await self.metadata.links.add(upstream.name, repo, [digest])

    async def _a_blob_there(self, upstream: Upstream, repo: str, digest: str, principal: Principal,
                            file: BinaryIO) -> None:
        """Stored content not known as a blob (a manifest, or a file whose row is not written yet)
        is served through /blobs/ only where upstream serves it as a blob: one HEAD says so, or
        raises UpstreamError (404 → BLOB_UNKNOWN). Manifests are linked to their repositories
        too, so a link alone does not say it."""
        key = (upstream.name, repo, digest)
        kind = await self.metadata.content.kind(digest)
        if kind == "blob" or key in self._served_as_blob:
            return
        await upstream.head_blob(repo, digest, principal.upstream)
        # a signed schema1 manifest is stored with its signatures: those bytes are not the blob
        if kind == "manifest" and not await asyncio.to_thread(_hashes_to, file, digest):
            raise RegistryError("BLOB_UNKNOWN", 404, f"{digest} is cached as a signed manifest, not as this blob")
        self._served_as_blob[key] = True

    def _hit(self, request: web.Request, digest: str, file: BinaryIO) -> web.StreamResponse:
        """The stored blob in `file`, as the request's conditionals and ranges select: a SentFile
        (which then owns `file`) for a body, else the bare response (the caller closes `file`).

        Raises RegistryError RANGE_INVALID (416) for an unsatisfiable Range.
        """
        answer = plan(request, digest, os.fstat(file.fileno()).st_size)
        request[RESULT] = "hit"
        self.metadata.content.touch(digest, self.clock())
        if answer.status == 304 or request.method == "HEAD":
            return answer.response()
        return SentFile(file, answer)

    async def _head_miss(
        self, request: web.Request, upstream: Upstream, repo: str, digest: str, principal: Principal
    ) -> web.StreamResponse:
        request[RESULT] = "miss"
        size = await self.access.observe(upstream, repo, principal, upstream.head_blob(repo, digest, principal.upstream))
        if size is None:
            size = await descriptor_size(self.metadata, self.store, upstream.name, repo, digest)
        return plan(request, digest, size).response()

    async def _size_of(self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None) -> int | None:
        """The size of a blob upstream sends without Content-Length: what the repository's cached
        manifests say, else what an upstream HEAD says; None if neither knows (then it goes out chunked)."""
        size = await descriptor_size(self.metadata, self.store, upstream.name, repo, digest)
        if size is None:
            try:
                size = await upstream.head_blob(repo, digest, creds)
            except UpstreamError as exc:
                log.info("no size for %s in %s: %s", digest, repo, exc)
        if size is None:
            log.warning("%s from %s/%s has no known size: sending it chunked", digest, upstream.name, repo)
        return size

    async def _stored(self, fetch: Fetch) -> None:
        now = self.clock()
        await self.metadata.content.add(fetch.digest, fetch.written, None, "blob", now)
        await self.metadata.links.add(fetch.upstream, fetch.repo, [fetch.digest])

    async def _stream(self, request: web.Request, fetch: Fetch, head: bool) -> web.StreamResponse:
        """Send the blob from the growing file: headers once upstream answered, bytes as they land.

        A following secondary worker is sent progress instead of bytes, for the whole blob or
        one range. Raises the UpstreamError of a fetch that upstream refused before sending anything.
        """
        await fetch.wait_started()
        answer = plan(request, fetch.digest, fetch.size)
        resp = answer.response()
        if answer.status == 304:
            return resp
        # asked now: once the client is gone, the request no longer knows which socket it came by
        secondary = from_secondary(request)
        try:
            if not head and len(answer.parts) == 1 and answer.multipart is None and fetch.tmp_name \
                    and follow.wants_follow(request):
                await follow.send_progress(request, resp, fetch, *answer.parts[0])
                await resp.write_eof()
                return resp
            await resp.prepare(request)
            if head:
                return resp
            if answer.length is None:
                await self._send(request, resp, fetch, 0, None)
            else:
                await answer.send(resp, lambda start, stop: self._send(request, resp, fetch, start, stop))
            await resp.write_eof()
        except ConnectionError as exc:
            if not secondary:  # a secondary worker's client that left is counted there
                client_left(request, exc)
        except FetchFailed as exc:
            log.warning("aborting %s %s: %s", request.method, request.path, exc)
            if request.transport is not None:
                request.transport.abort()
            request[RESULT] = "error"
        return resp  # whatever became of this client, the fetch goes on for the others

    async def _send(self, request: web.Request, resp: web.StreamResponse, fetch: Fetch, start: int,
                    end: int | None) -> None:
        """Bytes in the temp file go out with sendfile (no copy through Python), the rest by write.

        With no length known the body is chunked, which sendfile cannot frame: it is copied.
        """
        # aclosing: a reader that stops (its client left) is no longer waited for at once
        async with contextlib.aclosing(fetch.spans(start, end)) as spans:
            if end is None:
                async for span in spans:
                    await resp.write(fetch.pread(span))
                return
            with fetch.open_file() as file:
                async for span in spans:
                    if span.data is None:
                        await sending.send_file(request, file, span.offset, span.count)
                    else:
                        await resp.write(span.data)
