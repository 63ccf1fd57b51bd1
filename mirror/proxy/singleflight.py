"""One piece of work per key at a time: the coalescing of manifest fetches, tag revalidations
and access questions. (Blob fetches coalesce in `inflight`, whose followers also read the
bytes as they arrive.)"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Hashable, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Run one coroutine per key at a time; concurrent callers share its result.

    The shared work is shielded: a caller that goes away does not cancel it.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def do(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        fut = self._running.get(key)
        if fut is None:
            fut = asyncio.ensure_future(work())
            self._running[key] = fut
            fut.add_done_callback(lambda f: self._ended(key, f))
        return await asyncio.shield(fut)

    def _ended(self, key: Hashable, fut: asyncio.Future[Any]) -> None:
        self._running.pop(key, None)
        if not fut.cancelled():
            # callers still waiting get the error raised; when all of them left (a revalidation
            # cancelled at shutdown), it must not be reported as "never retrieved"
            fut.exception()
