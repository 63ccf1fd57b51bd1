"""A secondary worker hands what it cannot serve from the cache to the primary, over a unix socket.

The request goes over whole (method, path, headers, body) with the client's
address and scheme added; the primary's answer streams back unchanged, status,
headers and body, so the client cannot tell which worker it reached. The
primary logs and counts the request; the secondary does neither, except for a
client that goes away mid-answer, which only the secondary sees.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict
from yarl import URL

from aiohttp.typedefs import Handler
from mirror.errors import NeedsPrimary, RegistryError, error_response
from mirror.observe import client_left
from mirror.responses import follow, sending
from mirror.storage.store import ContentStore
from mirror.requestinfo import CLIENT_ADDRESS, CLIENT_SCHEME, FORWARDED, HANDED_BY

log = logging.getLogger("mirror.workers")

# Headers about one connection, not the message (RFC 9110 §7.6.1), and those aiohttp writes itself.
_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Content-Length", "Date", "Server",
))
_CHUNK = 1 << 20
CONNECT_TIMEOUT = 10.0


class PrimaryLink:
    """The secondary's keep-alive connections to the primary's unix socket."""

    def __init__(self, socket_path: str, worker: int, store: ContentStore) -> None:
        self.socket_path = socket_path
        self.worker = worker
        self.store = store  # where a followed blob's temp file is
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(self.socket_path, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                auto_decompress=False,
                read_bufsize=_CHUNK,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Send `request` to the primary and stream its answer to the client.

        A blob GET asks to follow the primary's temp file; if that file and the blob are
        both gone by the time this worker opens them (stored, then evicted), it asks again
        for the bytes themselves, which the primary then has to fetch anew.
        """
        request[FORWARDED] = True
        # A multidict: clients repeat headers (Accept), and each line must reach the primary.
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        headers[CLIENT_ADDRESS] = request.remote or ""
        headers[CLIENT_SCHEME] = request.scheme
        headers[HANDED_BY] = str(self.worker)
        if request.method == "GET" and "/blobs/" in request.path:
            headers[follow.FOLLOW] = "1"
        body = await request.read() if request.can_read_body else None
        try:
            return await self._exchange(request, headers, body)
        except follow.Vanished as exc:
            log.debug("%s: %s; asking the primary for the bytes", request.path, exc)
            headers.popall(follow.FOLLOW)
            return await self._exchange(request, headers, body)

    async def _exchange(self, request: web.Request, headers: CIMultiDict[str], body: bytes | None) -> web.StreamResponse:
        """One request to the primary, its answer relayed; raises follow.Vanished (nothing sent yet)."""
        try:
            answer = await self.session.request(
                request.method, URL(f"http://primary{request.raw_path}", encoded=True), headers=headers, data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("cannot reach the primary worker at %s: %s", self.socket_path, exc)
            return _unavailable()
        async with answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            try:
                if follow.is_followed(answer):
                    await follow.relay(request, answer, response, self.store)
                    return response
                if answer.content_length is not None:
                    response.content_length = answer.content_length
                await response.prepare(request)
                async for chunk in answer.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
            except sending.ClientGone as exc:
                client_left(request, exc)
            except (aiohttp.ClientError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                # a write to a client that left raises only once its transport is closing
                if request.transport is None or request.transport.is_closing():
                    client_left(request, exc)
                    return response
                log.warning("the primary worker's answer to %s broke off: %s", request.path, exc)
                if not response.prepared:
                    return _unavailable()
                request.transport.abort()  # rather than end a short body as if it were whole
            return response


def _unavailable() -> web.Response:
    return error_response(RegistryError(
        "UNAVAILABLE", 503, "the mirror's primary worker is not answering (restarting?); retry shortly",
        headers={"Retry-After": "1"}))


def forward_middleware(link: PrimaryLink) -> Middleware:
    """Serve locally what the cache holds; hand the request to the primary at the first NeedsPrimary."""

    @web.middleware
    async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except NeedsPrimary:
            return await link.forward(request)

    return forward
