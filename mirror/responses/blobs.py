"""Blob answers as HTTP: a stored file by sendfile, a fetch as its temp file grows, a HEAD's headers.

A blob the fleet's bucket holds may instead be answered with a 307 to a presigned URL
(`[storage.s3] redirect`). Every other answer, from the cache or from upstream, has the ETag `"<digest>"` and honours
If-None-Match, If-Range and Range: one range (206), several (206 multipart/byteranges)
or none satisfiable (416), see `ranges`. Every answer has a Content-Length unless the
blob's size is not known at all (upstream sent none, and neither the cached manifests
nor an upstream HEAD knew it): then the body is chunked.

With several worker processes, a secondary asks the primary to let it follow the temp
file of a miss (`follow`): the primary then sends progress instead of bytes, for the
whole blob or one range; several ranges of a miss come through the primary's socket
(they are a table of contents: small).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Awaitable, BinaryIO, Callable, NamedTuple

from aiohttp import web

from mirror.errors import RegistryError
from mirror.observe import client_left
from mirror.proxy.blobs import BlobAnswer, BlobFetch, BlobHit, BlobRedirect
from mirror.proxy.inflight import Fetch, FetchFailed
from mirror.requestinfo import RESULT, from_secondary
from mirror.responses import ranges, sending
from mirror.responses.ranges import ByteRange, Multipart
from mirror.responses import follow

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


async def respond(request: web.Request, answer: BlobAnswer) -> web.StreamResponse:
    """The response to a GET or HEAD of a blob, as `request`'s conditionals and ranges select.

    Takes `answer` over: it is closed once its body is sent (for a stored file, by the
    SentFile that sends it), or at once if there is none. Raises RegistryError RANGE_INVALID
    (416) for an unsatisfiable Range. A fetch is sent here, before this returns: a client
    that leaves is counted, a fetch that fails midway (a digest mismatch, upstream breaking
    off) aborts the connection, so the client sees a truncated body, and marks the request an error.
    """
    if isinstance(answer, BlobHit):
        return _stored(request, answer)
    if isinstance(answer, BlobRedirect):
        # distribution's answer for storage that serves clients itself; the client sends its Range there
        return web.Response(status=307, headers={"Location": answer.url, "Docker-Content-Digest": answer.digest})
    try:
        if isinstance(answer, BlobFetch):
            return await _growing(request, answer.fetch)
        return plan(request, answer.digest, answer.size).response()
    finally:
        answer.close()


def _stored(request: web.Request, hit: BlobHit) -> web.StreamResponse:
    """A SentFile (which then owns the file) for a body, else the bare response (the file closed)."""
    try:
        answer = plan(request, hit.digest, hit.size)
    except BaseException:
        hit.close()
        raise
    if answer.status == 304 or request.method == "HEAD":
        hit.close()
        return answer.response()
    return SentFile(hit.file, answer)


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


async def _growing(request: web.Request, fetch: Fetch) -> web.StreamResponse:
    """Send the blob from the growing file: headers at once (upstream answered), bytes as they land.

    A following secondary worker is sent progress instead of bytes, for the whole blob or
    one range.
    """
    head = request.method == "HEAD"
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
            await _send(request, resp, fetch, 0, None)
        else:
            await answer.send(resp, lambda start, stop: _send(request, resp, fetch, start, stop))
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


async def _send(request: web.Request, resp: web.StreamResponse, fetch: Fetch, start: int, end: int | None) -> None:
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
