"""Tags: a repository's mutable names for manifests, each with the time it must be checked again."""
from __future__ import annotations

from dataclasses import dataclass

from cachetools import LRUCache

from mirror.storage.metadata.database import Database, coalesced


@dataclass(frozen=True)
class TagRow:
    upstream: str
    repo: str
    tag: str
    digest: str
    media_type: str
    fetched_at: float  # epoch seconds
    expires_at: float  # epoch seconds: fresh until then


class Tags:
    """Hot tags are answered from memory."""

    def __init__(self, db: Database, cache_entries: int) -> None:
        self._db = db
        self._cached: LRUCache[tuple[str, str, str], TagRow] = LRUCache(cache_entries)

    async def get(self, upstream: str, repo: str, tag: str, now: float | None = None) -> TagRow | None:
        """The tag's row; one remembered but expired at `now` is read again, as another
        worker process may have revalidated it since."""
        row = self._cached.get((upstream, repo, tag))
        if row is not None and (now is None or now < row.expires_at):
            return row
        return await self._read(upstream, repo, tag)

    def cached(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        """The row `get` would answer from memory (expired or not), without reading the database."""
        return self._cached.get((upstream, repo, tag))

    @coalesced
    async def _read(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        key = (upstream, repo, tag)
        found = await self._db.fetchone(
            "SELECT digest, media_type, fetched_at, expires_at FROM tags WHERE upstream=? AND repo=? AND tag=?", key
        )
        if found is None:
            return None
        row = self._cached[key] = TagRow(upstream, repo, tag, *found)
        return row

    async def put(self, row: TagRow) -> None:
        async with self._db.transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.upstream, row.repo, row.tag, row.digest, row.media_type, row.fetched_at, row.expires_at),
            )
        self._cached[(row.upstream, row.repo, row.tag)] = row

    async def drop(self, upstream: str, repo: str, tag: str) -> None:
        async with self._db.transaction() as db:
            await db.execute("DELETE FROM tags WHERE upstream=? AND repo=? AND tag=?", (upstream, repo, tag))
        self._cached.pop((upstream, repo, tag), None)

    def forget_cached(self) -> None:
        """Drop what is remembered, after rows went by a wider route (a digest or a repository)."""
        self._cached.clear()
