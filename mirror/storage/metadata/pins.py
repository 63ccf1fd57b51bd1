"""Pins: images the operator keeps out of eviction, by tag or by digest."""
from __future__ import annotations

from mirror.storage.metadata.database import Database


class Pins:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, upstream: str, repo: str, ref: str) -> None:
        async with self._db.transaction() as db:
            await db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?, ?)", (upstream, repo, ref))

    async def remove(self, upstream: str, repo: str, ref: str) -> bool:
        """False if there was no such pin."""
        async with self._db.transaction() as db:
            cur = await db.execute("DELETE FROM pins WHERE upstream=? AND repo=? AND ref=?", (upstream, repo, ref))
        return cur.rowcount > 0

    async def all(self) -> list[tuple[str, str, str]]:
        """(upstream, repo, tag or digest), sorted."""
        rows = await self._db.fetchall("SELECT upstream, repo, ref FROM pins ORDER BY upstream, repo, ref")
        return [(str(u), str(r), str(ref)) for u, r, ref in rows]
