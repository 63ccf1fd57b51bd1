"""Revalidating what the cache holds within a deadline, and the work that outlives it.

An expired tag, access decision, tag list or referrers answer is asked of upstream again,
but a client with a cached answer waits for it only until the upstream's
`revalidate_timeout`: past it the cached answer stands and the revalidation goes on in
the background, refreshing what it can.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Generic, Hashable, TypeVar

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.proxy.singleflight import SingleFlight
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError

log = logging.getLogger("mirror.revalidation")
T = TypeVar("T")


class Overdue(Exception):
    """Upstream did not answer by the revalidation deadline; the work goes on in the background."""


def revalidation_deadline(upstream: Upstream) -> float:
    """When, on the event loop's clock, revalidating a cached answer that starts now is overdue."""
    return asyncio.get_running_loop().time() + upstream.config.revalidate_timeout


class Background:
    """Revalidations that outlive the requests which waited for them.

    `within` waits for upstream work up to a deadline. Work still running then is kept here
    until it ends: referenced (the event loop holds tasks only weakly) and with its outcome
    logged, never raised, since no one awaits it any more (asyncio would otherwise report
    "Task exception was never retrieved").
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._overdue: dict[Hashable, asyncio.Task[Any]] = {}  # key → its work still running past the deadline

    async def within(self, key: Hashable, deadline: float, start: Callable[[], Awaitable[T]], what: str) -> T:
        """The result of `start()` if it comes by `deadline` (event loop time; `what` names the
        work in the log).

        Raises Overdue past it, leaving the work to finish in the background; and at once,
        starting nothing, while work started earlier for `key` is still overdue: upstream is
        being asked already and has not answered in time. Other exceptions are the work's own.
        A caller cancelled while it waits leaves the work running in the background too.
        """
        if key in self._overdue:
            raise Overdue()
        task = asyncio.ensure_future(start())
        try:
            await asyncio.wait({task}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        finally:
            if not task.done():
                self._adopt(key, task, what)
        if not task.done():
            log.info("%s: no answer from the upstream by the deadline; it goes on in the background", what)
            raise Overdue()
        return task.result()

    def _adopt(self, key: Hashable, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.add(task)
        self._overdue[key] = task

        def ended(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if self._overdue.get(key) is task:
                del self._overdue[key]
            if task.cancelled():
                return
            if (exc := task.exception()) is None:
                log.info("%s: done in the background", what)
            elif isinstance(exc, (UpstreamError, RegistryError)):
                log.info("%s: failed in the background: %s", what, exc)
            else:
                log.error("%s: failed in the background", what, exc_info=exc)

        task.add_done_callback(ended)

    async def idle(self) -> None:
        """Wait until all work left to the background has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Cancel what is left (at shutdown: before the upstream sessions and the database close
        under it) and wait until it has ended."""
        for task in list(self._tasks):
            task.cancel()
        await self.idle()


class AnswerCache(Generic[T]):
    """Upstream answers passed through with a short cache (tag lists, referrers): fresh for
    `fresh_for` seconds, then asked again within the revalidation deadline, and standing in
    while upstream is down, failing, throttling or past the deadline. One upstream request per
    key at a time."""

    def __init__(self, fresh_for: float, clock: Callable[[], float] = time.time, maxsize: int = 10_000) -> None:
        self.fresh_for = fresh_for
        self.clock = clock
        self.background = Background()  # refreshes past the revalidation deadline
        self._last: LRUCache[Hashable, tuple[float, T]] = LRUCache(maxsize)
        self._flights = SingleFlight()

    async def get(self, key: Hashable, upstream: Upstream, ask: Callable[[], Awaitable[T]], what: str,
                  deadline: float | None = None) -> tuple[T, str]:
        """(the answer, "hit", "miss" or "stale"); `deadline` (event loop time) defaults to the
        upstream's revalidation deadline from now. Raises `ask`'s UpstreamError when nothing
        cached can stand in."""
        last = self._last.get(key)
        if last and self.clock() - last[0] < self.fresh_for:
            return last[1], "hit"

        async def ask_and_keep() -> T:
            answer = await ask()
            self._last[key] = (self.clock(), answer)
            return answer

        shared = lambda: self._flights.do(key, ask_and_keep)  # noqa: E731
        try:
            if last is None:
                return await shared(), "miss"
            if deadline is None:
                deadline = revalidation_deadline(upstream)
            return await self.background.within(key, deadline, shared, what), "miss"
        except Overdue:
            assert last is not None  # only a cached answer is asked for against the deadline
            return last[1], "stale"
        except UpstreamError as exc:
            if exc.outage and last:
                return last[1], "stale"
            raise
