"""Serve an aiohttp app from its own thread and event loop.

Integration servers must outlive function-scoped event loops and keep answering
while a test blocks on a subprocess (skopeo, podman, ctr, docker).
"""
from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class ThreadedServer:
    def __init__(self) -> None:
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self, app: web.Application, port: int = 0, name: str = "server", host: str = "127.0.0.1") -> str:
        """Serve `app` on `host`:`port` (0: any free port); return the base URL."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
        thread.start()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

        async def serve() -> int:
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            return int(runner.addresses[0][1])

        bound = asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=10)
        self._loop, self._thread, self._runner = loop, thread, runner
        self.url = f"http://{host}:{bound}"
        return self.url

    def stop(self) -> None:
        if self._loop is None or self._thread is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._runner = None
        self.url = None
