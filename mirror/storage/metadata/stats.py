"""What the cache holds and what it serves most: for `cache stats` and the cache gauges."""
from __future__ import annotations

import logging
import sqlite3

from mirror.metrics import CacheUsage
from mirror.storage.metadata.database import Database
from mirror.storage.metadata.writebehind import WriteBehind

log = logging.getLogger("mirror.metadata")

_BY_KIND = "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM content GROUP BY kind"


class Stats:
    def __init__(self, db: Database, batch: WriteBehind) -> None:
        self._db = db
        self._batch = batch

    def count_hit(self, upstream: str, repo: str) -> None:
        """Count a cache hit in memory; the write-behind batch adds the counts up in the database."""
        self._batch.count_hit(upstream, repo)

    async def top_hits(self, limit: int) -> list[tuple[str, str, int]]:
        """(upstream, repo, hits) of the most hit repositories, since each was first served."""
        rows = await self._db.fetchall("SELECT upstream, repo, count FROM hits ORDER BY count DESC LIMIT ?", (limit,))
        return [(str(u), str(r), int(n)) for u, r, n in rows]

    async def usage_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind → (objects, bytes)."""
        return {str(kind): (int(n), int(size)) for kind, n, size in await self._db.fetchall(_BY_KIND)}

    def read_usage(self) -> CacheUsage | None:
        """Totals by kind, read now on a read-only connection of its own (WAL lets it run beside
        the writer, in any worker process), for gauges computed at scrape time; None if the
        database cannot be read."""
        path = self._db.path
        if not path.exists():
            return None
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                rows = db.execute(_BY_KIND).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.warning("cannot read cache usage from %s: %s", path, exc)
            return None
        return CacheUsage(sum(int(r[2]) for r in rows), {str(r[0]): int(r[1]) for r in rows})

    async def oldest_access(self) -> float | None:
        """The earliest last access (epoch seconds) of anything cached; None if nothing is."""
        row = await self._db.fetchone("SELECT MIN(last_access) FROM content")
        return float(row[0]) if row and row[0] is not None else None

    async def repositories_by_size(self, limit: int) -> list[tuple[str, str, int]]:
        """(upstream, repo, bytes of cached content linked to it), largest first."""
        rows = await self._db.fetchall(
            "SELECT l.upstream, l.repo, SUM(c.size) FROM links l JOIN content c ON c.digest = l.digest"
            " GROUP BY l.upstream, l.repo ORDER BY 3 DESC LIMIT ?",
            (limit,),
        )
        return [(str(u), str(r), int(size)) for u, r, size in rows]
