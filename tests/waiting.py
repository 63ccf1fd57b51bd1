"""Bounded waits for state that no event announces (another task's bookkeeping, a process, a log).

Where an event can be awaited, await it instead; these poll, and fail with an AssertionError
that names what was awaited and the last value seen, never by hanging.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _message(what: str, timeout: float, value: object) -> str:
    return f"{what}: not after {timeout:g} s (last value: {value!r})"


async def wait_until(predicate: Callable[[], T | Awaitable[T]], *, timeout: float = 10.0, what: str,
                     check: Callable[[T], object] = bool, interval: float = 0.005) -> T:
    """Call `predicate` (sync or async) every `interval` seconds until `check` holds for what it
    returns (by default: until it is truthy); that value is returned.

    Raises AssertionError naming `what` and the last value after `timeout` seconds. Exceptions
    the predicate raises propagate at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value: Any = predicate()
        if inspect.isawaitable(value):
            value = await value
        if check(value):
            return value  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout, value))
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], T], *, timeout: float = 10.0, what: str,
                    check: Callable[[T], object] = bool, interval: float = 0.05) -> T:
    """`wait_until` for code outside an event loop (integration tests polling processes, HTTP, logs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if check(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout, value))
        time.sleep(interval)
