"""The index database (SQLite, WAL): what content the store holds, tags with their TTLs,
repository links, access decisions, pins and hit counts.

`Metadata` owns the connection and the write-behind batch, and gives one object per concept:

    metadata.content       content rows, access times           (content.py)
    metadata.links         which repositories content belongs to (content.py)
    metadata.descriptors   sizes manifests give their parts      (content.py)
    metadata.tags          tags and their expiry                 (tags.py)
    metadata.access        access decisions                      (access.py)
    metadata.pins          pinned images                         (pins.py)
    metadata.stats         hit counts and usage                  (stats.py)

The tables and their upgrades are in schema.py; access times, hit counts and access decisions
are written in batches (writebehind.py), so a cache hit never waits on a write.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from mirror.storage.metadata.access import AccessDecisions
from mirror.storage.metadata.content import Content, ContentRow, Descriptors, Links
from mirror.storage.metadata.database import Database
from mirror.storage.metadata.pins import Pins
from mirror.storage.metadata.schema import SCHEMA_VERSION, SchemaTooNew
from mirror.storage.metadata.stats import Stats
from mirror.storage.metadata.tags import TagRow, Tags
from mirror.storage.metadata.writebehind import WriteBehind

__all__ = ["SCHEMA_VERSION", "ContentRow", "Metadata", "SchemaTooNew", "TagRow"]

log = logging.getLogger("mirror.metadata")


class Metadata:
    """`on_grown` is called (synchronously, so it must be cheap) each time a new content row adds
    to `content.size`: the cache's owner decides there whether the size cap was crossed."""

    def __init__(self, path: Path, cache_entries: int = 100_000, on_grown: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.db = Database(path)
        self._batch = WriteBehind(self.db)
        self.content = Content(self.db, self._batch, cache_entries, on_grown)
        self.links = Links(self.db, cache_entries)
        self.descriptors = Descriptors(self.db)
        self.tags = Tags(self.db, cache_entries)
        self.access = AccessDecisions(self.db, self._batch)
        self.pins = Pins(self.db)
        self.stats = Stats(self.db, self._batch)

    async def open(self) -> None:
        """Open (creating or upgrading the database); raises SchemaTooNew for a newer one."""
        await self.db.open()
        await self.content.load_size()

    async def close(self) -> None:
        if self.db.is_open:
            if not await self.flush():
                log.error("closing with access times, hit counts or access decisions that could not be written")
            await self.db.close()

    async def ping(self) -> bool:
        """Whether the database answers (for readiness)."""
        return await self.db.ping()

    async def flush(self) -> bool:
        """Write the access times, hit counts and access decisions kept in memory; False if the
        write failed (they are kept, and written with the next flush)."""
        return await self._batch.flush()

    async def drop_content(self, digests: Iterable[str]) -> None:
        """Forget content that left the store, and every tag, link and descriptor that refers to it."""
        await self.content.drop(digests)
        self.tags.forget_cached()
        self.links.forget_cached()

    async def forget_repository(self, upstream: str, repo: str) -> None:
        """Drop a repository's tags, links, access decisions and hit count (its content is dropped separately)."""
        async with self.db.transaction() as db:
            for table in ("tags", "links", "access", "hits"):
                await db.execute(f"DELETE FROM {table} WHERE upstream=? AND repo=?", (upstream, repo))
        self.tags.forget_cached()
        self.links.forget_cached()
