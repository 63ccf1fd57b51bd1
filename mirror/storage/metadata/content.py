"""Content rows (what the store holds), links (which repositories upstream serves it through)
and descriptors (the sizes stored manifests give what they reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from cachetools import LRUCache

from mirror.storage.metadata.database import Database, coalesced
from mirror.storage.metadata.writebehind import WriteBehind


@dataclass(frozen=True)
class ContentRow:
    digest: str
    size: int  # bytes
    media_type: str | None
    kind: str  # "blob" or "manifest"


class Content:
    """`on_grown` is called (synchronously, so it must be cheap) each time a new row adds to `size`:
    the cache's owner decides there whether the size cap was crossed."""

    def __init__(self, db: Database, batch: WriteBehind, cache_entries: int, on_grown: Callable[[], None]) -> None:
        self._db = db
        self._batch = batch
        self._kinds: LRUCache[str, str] = LRUCache(cache_entries)
        self.on_grown = on_grown
        self.size = 0  # bytes of content with a row, kept current as rows come and go

    async def load_size(self) -> None:
        """Set `size` from the rows (at open, and after rows went)."""
        row = await self._db.fetchone("SELECT COALESCE(SUM(size), 0) FROM content")
        self.size = int(row[0]) if row else 0

    async def add(self, digest: str, size: int, media_type: str | None, kind: str, now: float) -> None:
        """Record stored content; for a known digest, a missing media type is filled in (never
        replaced) and the access time moves to `now`."""
        async with self._db.transaction() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO content (digest, size, media_type, kind, created_at, last_access)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (digest, size, media_type, kind, now, now),
            )
            added = cur.rowcount > 0
            if not added:
                await db.execute(
                    "UPDATE content SET last_access=?, media_type=coalesce(media_type, ?) WHERE digest=?",
                    (now, media_type, digest),
                )
        if added:
            self.size += size
            self.on_grown()

    def touch(self, digests: Iterable[str], now: float) -> None:
        """Record an access to each of `digests` in memory (one call per request, on the hit
        path); the write-behind batch writes them."""
        self._batch.touch(digests, now)

    async def kind(self, digest: str) -> str | None:
        """"blob" or "manifest" for stored content, None without a row; remembered, so a
        cache hit asks the database once per digest."""
        kind = self._kinds.get(digest)
        if kind is None and (row := await self.get(digest)) is not None:
            kind = self._kinds[digest] = row.kind
        return kind

    @coalesced
    async def get(self, digest: str) -> ContentRow | None:
        row = await self._db.fetchone("SELECT digest, size, media_type, kind FROM content WHERE digest=?", (digest,))
        return ContentRow(*row) if row else None

    async def count(self) -> int:
        """How many objects have a row."""
        row = await self._db.fetchone("SELECT count(*) FROM content")
        return int(row[0]) if row else 0

    async def sizes(self, shard: str | None = None) -> dict[str, int]:
        """digest → bytes of everything with a row, or of the digests whose hex begins with the
        two hex digits `shard` (for reconciliation, a shard at a time)."""
        if shard is None:
            return {d: int(s) for d, s in await self._db.fetchall("SELECT digest, size FROM content")}
        low = "sha256:" + shard
        rows = await self._db.fetchall("SELECT digest, size FROM content WHERE digest >= ? AND digest < ?",
                                       (low, low + "g"))  # "g" sorts after every hex digit
        return {d: int(s) for d, s in rows}

    async def usage(self) -> list[tuple[str, int, str, float]]:
        """(digest, size, kind, last_access) of everything cached, for eviction planning."""
        rows = await self._db.fetchall("SELECT digest, size, kind, last_access FROM content")
        return [(d, int(size), kind, float(at)) for d, size, kind, at in rows]

    async def drop(self, digests: Iterable[str]) -> None:
        """Forget content that left the store, with everything that refers to it: links, tags
        pointing at it, a manifest's descriptors. Cached tags and links are the caller's to forget."""
        batch = [(d,) for d in digests]
        async with self._db.transaction() as db:
            await db.executemany("DELETE FROM content WHERE digest=?", batch)
            await db.executemany("DELETE FROM links WHERE digest=?", batch)
            await db.executemany("DELETE FROM tags WHERE digest=?", batch)
            await db.executemany("DELETE FROM descriptors WHERE manifest=?", batch)
        for (digest,) in batch:
            self._kinds.pop(digest, None)
        await self.load_size()  # one query, not one per digest


class Links:
    """(upstream, repo, digest): upstream serves the content through that repository. Cached
    content is served through a repository only if it is linked there. Known links are remembered."""

    def __init__(self, db: Database, cache_entries: int) -> None:
        self._db = db
        self._cached: LRUCache[tuple[str, str, str], bool] = LRUCache(cache_entries)

    async def add(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        new = [d for d in dict.fromkeys(digests) if (upstream, repo, d) not in self._cached]
        if not new:
            return
        async with self._db.transaction() as db:
            await db.executemany("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", [(upstream, repo, d) for d in new])
        for d in new:
            self._cached[(upstream, repo, d)] = True

    async def contains(self, upstream: str, repo: str, digest: str) -> bool:
        return self.known(upstream, repo, digest) or await self._read(upstream, repo, digest)

    def known(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether the link is remembered (a False says nothing: read it with `contains`)."""
        return (upstream, repo, digest) in self._cached

    @coalesced
    async def _read(self, upstream: str, repo: str, digest: str) -> bool:
        key = (upstream, repo, digest)
        found = await self._db.fetchone("SELECT 1 FROM links WHERE upstream=? AND repo=? AND digest=?", key)
        if found:
            self._cached[key] = True
        return found is not None

    async def of_repository(self, upstream: str, repo: str) -> tuple[set[str], set[str]]:
        """Digests linked to the repository: (only to it, to other repositories too)."""
        rows = await self._db.fetchall(
            "SELECT l.digest, (SELECT COUNT(*) FROM links o WHERE o.digest = l.digest"
            " AND NOT (o.upstream = l.upstream AND o.repo = l.repo)) FROM links l WHERE l.upstream=? AND l.repo=?",
            (upstream, repo),
        )
        return {d for d, others in rows if not others}, {d for d, others in rows if others}

    def forget_cached(self) -> None:
        """Drop what is remembered, after rows went by a wider route (a digest or a repository)."""
        self._cached.clear()


class Descriptors:
    """The size (bytes) each stored manifest's descriptors give what they reference (OCI image
    spec, descriptor `size`), recorded per manifest the first time a size is asked of its repository."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @coalesced
    async def size(self, upstream: str, repo: str, digest: str) -> int | None:
        """The size that manifests linked to the repository give `digest`, as far as their
        descriptors were recorded (`add`); None if none does."""
        row = await self._db.fetchone(
            "SELECT d.size FROM descriptors d JOIN links l ON l.digest = d.manifest"
            " WHERE d.digest=? AND l.upstream=? AND l.repo=? LIMIT 1",
            (digest, upstream, repo),
        )
        return int(row[0]) if row else None

    async def undescribed(self, upstream: str, repo: str) -> list[str]:
        """Stored manifests linked to the repository whose descriptors were not recorded yet."""
        rows = await self._db.fetchall(
            "SELECT c.digest FROM links l JOIN content c ON c.digest = l.digest"
            " WHERE l.upstream=? AND l.repo=? AND c.kind='manifest'"
            " AND NOT EXISTS (SELECT 1 FROM descriptors d WHERE d.manifest = c.digest)",
            (upstream, repo),
        )
        return [str(d) for (d,) in rows]

    async def add(self, manifest: str, sizes: dict[str, int]) -> None:
        """Record the sizes a stored manifest gives the content it references (digest → bytes).
        Include the manifest's own size: it also marks the manifest as described."""
        async with self._db.transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO descriptors VALUES (?, ?, ?)", [(manifest, d, n) for d, n in sizes.items()]
            )
