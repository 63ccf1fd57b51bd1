"""A reverse proxy between the mirror and a real registry that fails on command.

Integration tests point the mirror's upstream at it to make the real registry
look down (`refuse`), failing (`status = 503`), hung (`hang`) or slow (`delay`
per chunk of blob body), without touching the registry itself.
"""
from __future__ import annotations

import asyncio
from typing import NoReturn

import aiohttp
from aiohttp import web

from tests.fakes.threaded import ThreadedServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.status: int | None = None  # answer every request with this status
        self.hang = False  # never answer (until switched off)
        self.refuse = False  # close connections without answering
        self.delay = 0.0  # seconds to wait between 64 KiB chunks of a response body
        self.retry_after: int | None = None  # Docker Hub style: GETs of manifests and blobs → 429
        self.ratelimit_remaining: int | None = None  # sent as ratelimit-* headers on manifest GETs
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request that came in
        self.keep_host = False  # pass the client's Host on (a signed S3 request covers it)
        self.status_methods: set[str] | None = None  # `status` answers only these methods (None: all)
        self.url: str | None = None
        self._server = ThreadedServer()
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> str:
        self.url = self._server.start(self._app(), name="fault-proxy")
        return self.url

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        self.status, self.hang, self.refuse, self.delay = None, False, False, 0.0
        self.retry_after = self.ratelimit_remaining = self.status_methods = None

    def _ratelimit_headers(self, request: web.Request) -> dict[str, str]:
        if self.ratelimit_remaining is None or request.method != "GET" or "/manifests/" not in request.path:
            return {}
        return {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": f"{self.ratelimit_remaining};w=21600",
                "docker-ratelimit-source": "192.0.2.7"}

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)

        async def close_session(_: web.Application) -> None:
            if self._session is not None:
                await self._session.close()

        app.on_cleanup.append(close_session)
        return app

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        while self.hang:
            await asyncio.sleep(0.05)
        if self.refuse:
            self._abort(request)
        if self.status is not None and (self.status_methods is None or request.method in self.status_methods):
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected failure"}]}, status=self.status
            )
        pull = request.method == "GET" and ("/manifests/" in request.path or "/blobs/" in request.path)
        if self.retry_after is not None and pull:
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit."}]},
                status=429, headers={"Retry-After": str(self.retry_after), **self._ratelimit_headers(request)},
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if self.keep_host:
            headers["Host"] = request.host
        try:
            upstream = await self._session.request(
                request.method, self.target + request.path_qs, headers=headers,
                data=await request.read() or None, allow_redirects=False,
            )
        except aiohttp.ClientConnectorError:
            self._abort(request)  # the target is down: look down too
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, headers=self._ratelimit_headers(request))
            for k, v in upstream.headers.items():
                if k.lower() not in HOP_HEADERS:
                    resp.headers.add(k, v)
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if self.delay:
                    await asyncio.sleep(self.delay)
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    @staticmethod
    def _abort(request: web.Request) -> NoReturn:
        """Drop the client's connection without an answer, as a dead host would."""
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
