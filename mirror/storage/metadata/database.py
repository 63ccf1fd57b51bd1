"""One SQLite connection (WAL) shared by the metadata's parts, one operation at a time.

sqlite3 does not let a query and its fetches or commit interleave with another on the same
connection, so every operation holds the lock; identical reads running at the same time
share one query (`coalesced`).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, TypeVar, cast

import aiosqlite

from mirror.storage.metadata.schema import migrate

T = TypeVar("T")
Row = tuple[Any, ...]
# what a failed write raises: SQLITE_BUSY, a full disk, an I/O error (sqlite3.Error), or a
# connection closed under it (ValueError)
WRITE_ERRORS = (sqlite3.Error, OSError, ValueError)


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()
        self.reads: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        self._connection: aiosqlite.Connection | None = None

    @property
    def connection(self) -> aiosqlite.Connection:
        assert self._connection is not None, "Metadata.open() was not called"
        return self._connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    async def open(self) -> None:
        """Connect and migrate; raises SchemaTooNew (and stays closed) for a newer database."""
        connection = await aiosqlite.connect(self.path)
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=NORMAL")
            await connection.execute("PRAGMA busy_timeout=5000")
            await migrate(connection, self.path)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def ping(self) -> bool:
        """Whether the database answers (for readiness)."""
        if self._connection is None:
            return False
        try:
            await self.fetchone("SELECT 1")
        except (sqlite3.Error, ValueError):
            return False
        return True

    async def fetchone(self, sql: str, args: Iterable[object] = ()) -> Row | None:
        async with self.lock, self.connection.execute(sql, tuple(args)) as cur:
            return cast(Row | None, await cur.fetchone())

    async def fetchall(self, sql: str, args: Iterable[object] = ()) -> list[Row]:
        """Every row in one hop to the database thread (iterating takes a hop per row)."""
        async with self.lock, self.connection.execute(sql, tuple(args)) as cur:
            return cast(list[Row], await cur.fetchall())

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone, for statements committed together at the end, or rolled
        back together if one of them (or the commit) fails."""
        async with self.lock:
            try:
                yield self.connection
                await self.connection.commit()
            except BaseException:
                if self._connection is not None:
                    with contextlib.suppress(*WRITE_ERRORS):
                        await self._connection.rollback()
                raise


class _HasDatabase(Protocol):
    _db: Database


def coalesced(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Identical reads running at the same time share one query: a burst of requests for one
    thing at a cold worker would otherwise queue hundreds of them behind the lock."""

    @functools.wraps(method)
    async def run(self: _HasDatabase, *args: Any) -> T:
        reads = self._db.reads
        key = (method.__qualname__, *args)
        pending = reads.get(key)
        if pending is None:
            pending = reads[key] = asyncio.ensure_future(method(self, *args))
            pending.add_done_callback(lambda _done: reads.pop(key, None))
        return await asyncio.shield(pending)

    return run
