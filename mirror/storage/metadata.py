"""SQLite metadata (WAL): what content we hold, tags with their TTLs, repository links, and the
sizes manifests give their parts.

Hot lookups (tags, links) are served from in-memory caches in front of the
database, and access times are batched, so a cache hit never waits on a write.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import aiosqlite
from cachetools import LRUCache

log = logging.getLogger("mirror.metadata")

T = TypeVar("T")
SCHEMA_VERSION = 2  # 2: descriptors (sizes of what manifests reference); version 1 databases are upgraded
SCHEMA = """
CREATE TABLE IF NOT EXISTS content (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    media_type TEXT,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL,
    repo TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
CREATE INDEX IF NOT EXISTS tags_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS links (
    upstream TEXT NOT NULL,
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
);
CREATE INDEX IF NOT EXISTS links_digest ON links (digest);
CREATE TABLE IF NOT EXISTS access (
    upstream TEXT NOT NULL,
    repo TEXT NOT NULL,
    principal TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    decided_at REAL NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (upstream, repo, principal)
);
CREATE TABLE IF NOT EXISTS pins (
    upstream TEXT NOT NULL,
    repo TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, ref)
);
CREATE TABLE IF NOT EXISTS hits (
    upstream TEXT NOT NULL,
    repo TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (upstream, repo)
);
CREATE TABLE IF NOT EXISTS descriptors (
    manifest TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (manifest, digest)
);
CREATE INDEX IF NOT EXISTS descriptors_digest ON descriptors (digest);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""


def _serialized(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """One database operation at a time: a query and its fetches or commit never interleave
    with another coroutine's, which sqlite3 on one connection does not allow."""

    @functools.wraps(method)
    async def run(self: Metadata, *args: Any, **kwargs: Any) -> T:
        async with self._lock:
            return await method(self, *args, **kwargs)

    return run


def _coalesced(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Identical reads running at the same time share one query: a burst of requests for one
    thing at a cold worker would otherwise queue hundreds of them behind the lock."""

    @functools.wraps(method)
    async def run(self: Metadata, *args: Any) -> T:
        key = (method.__name__, *args)
        pending = self._reads.get(key)
        if pending is None:
            pending = self._reads[key] = asyncio.ensure_future(method(self, *args))
            pending.add_done_callback(lambda _done: self._reads.pop(key, None))
        return await asyncio.shield(pending)

    return run


class SchemaTooNew(Exception):
    """The database was written by a newer version of the mirror."""


@dataclass(frozen=True)
class TagRow:
    upstream: str
    repo: str
    tag: str
    digest: str
    media_type: str
    fetched_at: float
    expires_at: float


@dataclass(frozen=True)
class ContentRow:
    digest: str
    size: int
    media_type: str | None
    kind: str


class Metadata:
    """`on_grown` is called (synchronously, so it must be cheap) each time a new row adds to `size`:
    the cache's owner decides there whether the size cap was crossed."""

    def __init__(self, path: Path, cache_entries: int = 100_000, on_grown: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.on_grown = on_grown
        self._db: aiosqlite.Connection | None = None
        self._tags: LRUCache[tuple[str, str, str], TagRow] = LRUCache(cache_entries)
        self._links: LRUCache[tuple[str, str, str], bool] = LRUCache(cache_entries)
        self._kinds: LRUCache[str, str] = LRUCache(cache_entries)
        self._access: dict[str, float] = {}
        self._hits: Counter[tuple[str, str]] = Counter()
        self._decisions: dict[tuple[str, str, str], tuple[bool, float, str]] = {}
        self._writing: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._reads: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        self.size = 0  # bytes of content with a row, kept current as rows come and go

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "Metadata.open() was not called"
        return self._db

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self.db.executescript(SCHEMA)
        async with self.db.execute("SELECT version FROM schema_version") as cur:
            row = await cur.fetchone()
        if row is None:
            await self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            await self.close()
            raise SchemaTooNew(
                f"{self.path} has schema version {row[0]}; this mirror understands up to {SCHEMA_VERSION}"
            )
        elif row[0] < SCHEMA_VERSION:
            # the script above created what later versions added; descriptors fill in as they are needed
            await self.db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
        await self.db.commit()
        self.size = await self.total_size()

    async def ping(self) -> bool:
        """Whether the database answers (for readiness)."""
        if self._db is None:
            return False
        try:
            async with self._db.execute("SELECT 1") as cur:
                await cur.fetchone()
        except (sqlite3.Error, ValueError):
            return False
        return True

    async def close(self) -> None:
        if self._db is not None:
            await self.flush()
            await self._db.close()
            self._db = None

    # -- tags ---------------------------------------------------------------
    async def get_tag(self, upstream: str, repo: str, tag: str, now: float | None = None) -> TagRow | None:
        """The tag's row; one remembered but expired at `now` is read again, as another
        worker process may have revalidated it since."""
        row = self._tags.get((upstream, repo, tag))
        if row is not None and (now is None or now < row.expires_at):
            return row
        return await self._read_tag(upstream, repo, tag)

    @_coalesced
    @_serialized
    async def _read_tag(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        key = (upstream, repo, tag)
        async with self.db.execute(
            "SELECT digest, media_type, fetched_at, expires_at FROM tags WHERE upstream=? AND repo=? AND tag=?",
            key,
        ) as cur:
            found = await cur.fetchone()
        if found is None:
            return None
        row = TagRow(upstream, repo, tag, *found)
        self._tags[key] = row
        return row

    @_serialized
    async def put_tag(self, row: TagRow) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.upstream, row.repo, row.tag, row.digest, row.media_type, row.fetched_at, row.expires_at),
        )
        await self.db.commit()
        self._tags[(row.upstream, row.repo, row.tag)] = row

    # -- content and links ----------------------------------------------------
    @_serialized
    async def add_content(self, digest: str, size: int, media_type: str | None, kind: str, now: float) -> None:
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO content (digest, size, media_type, kind, created_at, last_access)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (digest, size, media_type, kind, now, now),
        )
        added = cur.rowcount > 0
        if added:
            self.size += size
        else:
            await self.db.execute(
                "UPDATE content SET last_access=?, media_type=coalesce(media_type, ?) WHERE digest=?",
                (now, media_type, digest),
            )
        await self.db.commit()
        if added:
            self.on_grown()

    async def content_kind(self, digest: str) -> str | None:
        """"blob" or "manifest" for stored content, None without a row; remembered, so a
        cache hit asks the database once per digest."""
        kind = self._kinds.get(digest)
        if kind is None and (row := await self.get_content(digest)) is not None:
            kind = self._kinds[digest] = row.kind
        return kind

    @_coalesced
    @_serialized
    async def get_content(self, digest: str) -> ContentRow | None:
        async with self.db.execute(
            "SELECT digest, size, media_type, kind FROM content WHERE digest=?", (digest,)
        ) as cur:
            row = await cur.fetchone()
        return ContentRow(*row) if row else None

    @_serialized
    async def link(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        new = [d for d in dict.fromkeys(digests) if (upstream, repo, d) not in self._links]
        if not new:
            return
        await self.db.executemany(
            "INSERT OR IGNORE INTO links VALUES (?, ?, ?)", [(upstream, repo, d) for d in new]
        )
        await self.db.commit()
        for d in new:
            self._links[(upstream, repo, d)] = True

    async def is_linked(self, upstream: str, repo: str, digest: str) -> bool:
        return (upstream, repo, digest) in self._links or await self._read_link(upstream, repo, digest)

    @_coalesced
    @_serialized
    async def _read_link(self, upstream: str, repo: str, digest: str) -> bool:
        key = (upstream, repo, digest)
        async with self.db.execute(
            "SELECT 1 FROM links WHERE upstream=? AND repo=? AND digest=?", key
        ) as cur:
            found = await cur.fetchone() is not None
        if found:
            self._links[key] = True
        return found

    # -- descriptor sizes --------------------------------------------------------
    @_coalesced
    @_serialized
    async def descriptor_size(self, upstream: str, repo: str, digest: str) -> int | None:
        """The size (bytes) that manifests linked to the repository give `digest`, as far as
        their descriptors were recorded (`add_descriptors`); None if none does."""
        async with self.db.execute(
            "SELECT d.size FROM descriptors d JOIN links l ON l.digest = d.manifest"
            " WHERE d.digest=? AND l.upstream=? AND l.repo=? LIMIT 1",
            (digest, upstream, repo),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None

    @_serialized
    async def undescribed_manifests(self, upstream: str, repo: str) -> list[str]:
        """Stored manifests linked to the repository whose descriptors were not recorded yet."""
        async with self.db.execute(
            "SELECT c.digest FROM links l JOIN content c ON c.digest = l.digest"
            " WHERE l.upstream=? AND l.repo=? AND c.kind='manifest'"
            " AND NOT EXISTS (SELECT 1 FROM descriptors d WHERE d.manifest = c.digest)",
            (upstream, repo),
        ) as cur:
            return [str(d) async for (d,) in cur]

    @_serialized
    async def add_descriptors(self, manifest: str, sizes: dict[str, int]) -> None:
        """Record the sizes a stored manifest gives the content it references (digest → bytes).
        Include the manifest's own size: it also marks the manifest as described."""
        await self.db.executemany(
            "INSERT OR IGNORE INTO descriptors VALUES (?, ?, ?)", [(manifest, d, n) for d, n in sizes.items()]
        )
        await self.db.commit()

    # -- access decisions -------------------------------------------------------
    async def get_access(self, upstream: str, repo: str, principal: str) -> tuple[bool, float, str] | None:
        """Upstream's last answer to "may `principal` (a fingerprint) read `repo`?"."""
        key = (upstream, repo, principal)
        pending = self._decisions.get(key)
        return pending if pending is not None else await self._read_access(*key)

    @_coalesced
    @_serialized
    async def _read_access(self, upstream: str, repo: str, principal: str) -> tuple[bool, float, str] | None:
        async with self.db.execute(
            "SELECT allowed, decided_at, message FROM access WHERE upstream=? AND repo=? AND principal=?",
            (upstream, repo, principal),
        ) as cur:
            row = await cur.fetchone()
        return (bool(row[0]), row[1], row[2]) if row else None

    def record_access(self, upstream: str, repo: str, principal: str, allowed: bool, at: float, message: str) -> None:
        """Keep a decision and write it at once, in the background: the client that brought it
        waits for no database write, and other worker processes read it a moment later."""
        self._decisions[(upstream, repo, principal)] = (allowed, at, message)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        except (sqlite3.Error, ValueError):
            log.exception("could not write access decisions")

    # -- access times and hit counts --------------------------------------------
    def touch(self, digest: str, now: float) -> None:
        """Record an access in memory; `flush` writes them in one batch."""
        self._access[digest] = now

    def count_hit(self, upstream: str, repo: str) -> None:
        """Count a cache hit in memory; `flush` adds the counts up in the database."""
        self._hits[(upstream, repo)] += 1

    @_serialized
    async def flush(self) -> None:
        """Write what was kept in memory: access times, hit counts (every worker process adds its
        own) and access decisions."""
        if not (self._access or self._hits or self._decisions) or self._db is None:
            return
        batch, self._access = self._access, {}
        hits, self._hits = self._hits, Counter()
        decisions, self._decisions = self._decisions, {}
        await self.db.executemany(
            "UPDATE content SET last_access=max(last_access, ?) WHERE digest=?",
            [(t, d) for d, t in batch.items()],
        )
        await self.db.executemany(
            "INSERT INTO hits VALUES (?, ?, ?) ON CONFLICT (upstream, repo) DO UPDATE SET count=count+excluded.count",
            [(u, r, n) for (u, r), n in hits.items()],
        )
        await self.db.executemany(
            "INSERT OR REPLACE INTO access VALUES (?, ?, ?, ?, ?, ?)",
            [(u, r, p, int(allowed), at, message) for (u, r, p), (allowed, at, message) in decisions.items()],
        )
        await self.db.commit()

    @_serialized
    async def top_hits(self, limit: int) -> list[tuple[str, str, int]]:
        """(upstream, repo, hits) of the most hit repositories, since each was first served."""
        async with self.db.execute("SELECT upstream, repo, count FROM hits ORDER BY count DESC LIMIT ?", (limit,)) as cur:
            return [(str(u), str(r), int(n)) for u, r, n in await cur.fetchall()]

    # -- size, eviction and pins ------------------------------------------------
    @_serialized
    async def total_size(self) -> int:
        async with self.db.execute("SELECT COALESCE(SUM(size), 0) FROM content") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    @_serialized
    async def content_usage(self) -> list[tuple[str, int, str, float]]:
        """(digest, size, kind, last_access) of everything cached, for eviction planning."""
        async with self.db.execute("SELECT digest, size, kind, last_access FROM content") as cur:
            # one hop to the database thread for all rows: iterating fetches a row per hop (100k rows: 160 → 60 ms)
            return [(d, int(size), kind, float(at)) for d, size, kind, at in await cur.fetchall()]

    @_serialized
    async def add_pin(self, upstream: str, repo: str, ref: str) -> None:
        await self.db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?, ?)", (upstream, repo, ref))
        await self.db.commit()

    @_serialized
    async def remove_pin(self, upstream: str, repo: str, ref: str) -> bool:
        cur = await self.db.execute("DELETE FROM pins WHERE upstream=? AND repo=? AND ref=?", (upstream, repo, ref))
        await self.db.commit()
        return cur.rowcount > 0

    @_serialized
    async def pins(self) -> list[tuple[str, str, str]]:
        async with self.db.execute("SELECT upstream, repo, ref FROM pins ORDER BY upstream, repo, ref") as cur:
            return [(u, r, ref) async for u, r, ref in cur]

    # -- inspection and maintenance ---------------------------------------------
    @_serialized
    async def usage_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind → (objects, bytes)."""
        async with self.db.execute("SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM content GROUP BY kind") as cur:
            return {kind: (int(n), int(size)) async for kind, n, size in cur}

    @_serialized
    async def oldest_access(self) -> float | None:
        async with self.db.execute("SELECT MIN(last_access) FROM content") as cur:
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    @_serialized
    async def repositories_by_size(self, limit: int) -> list[tuple[str, str, int]]:
        """(upstream, repo, bytes of cached content linked to it), largest first."""
        async with self.db.execute(
            "SELECT l.upstream, l.repo, SUM(c.size) FROM links l JOIN content c ON c.digest = l.digest"
            " GROUP BY l.upstream, l.repo ORDER BY 3 DESC LIMIT ?",
            (limit,),
        ) as cur:
            return [(u, r, int(size)) async for u, r, size in cur]

    @_serialized
    async def repository_digests(self, upstream: str, repo: str) -> tuple[set[str], set[str]]:
        """Digests linked to the repository: (only to it, to other repositories too)."""
        async with self.db.execute(
            "SELECT l.digest, (SELECT COUNT(*) FROM links o WHERE o.digest = l.digest"
            " AND NOT (o.upstream = l.upstream AND o.repo = l.repo)) FROM links l WHERE l.upstream=? AND l.repo=?",
            (upstream, repo),
        ) as cur:
            rows = [(d, int(others)) async for d, others in cur]
        return {d for d, others in rows if not others}, {d for d, others in rows if others}

    @_serialized
    async def forget_repository(self, upstream: str, repo: str) -> None:
        """Drop a repository's tags, links, access decisions and hit count (its content is dropped separately)."""
        for table in ("tags", "links", "access", "hits"):
            await self.db.execute(f"DELETE FROM {table} WHERE upstream=? AND repo=?", (upstream, repo))
        await self.db.commit()
        self._tags.clear()
        self._links.clear()

    @_serialized
    async def drop_tag(self, upstream: str, repo: str, tag: str) -> None:
        await self.db.execute("DELETE FROM tags WHERE upstream=? AND repo=? AND tag=?", (upstream, repo, tag))
        await self.db.commit()
        self._tags.pop((upstream, repo, tag), None)

    # -- reconciliation ---------------------------------------------------------
    @_serialized
    async def all_content(self) -> dict[str, int]:
        async with self.db.execute("SELECT digest, size FROM content") as cur:
            return {d: s async for d, s in cur}

    @_serialized
    async def drop_content(self, digests: Iterable[str]) -> None:
        batch = [(d,) for d in digests]
        await self.db.executemany("DELETE FROM content WHERE digest=?", batch)
        await self.db.executemany("DELETE FROM links WHERE digest=?", batch)
        await self.db.executemany("DELETE FROM tags WHERE digest=?", batch)
        await self.db.executemany("DELETE FROM descriptors WHERE manifest=?", batch)
        await self.db.commit()
        for (digest,) in batch:
            self._kinds.pop(digest, None)
        async with self.db.execute("SELECT COALESCE(SUM(size), 0) FROM content") as cur:
            self.size = int((await cur.fetchone() or (0,))[0])  # one query, not one per digest
        self._tags.clear()
        self._links.clear()

    # -- catalog ------------------------------------------------------------------
    @_serialized
    async def readable_repositories(self, principal: str, open_upstreams: Iterable[str]) -> list[tuple[str, str]]:
        """(upstream, repo) of repositories with cached content that `principal` (a fingerprint)
        may read: upstream's last answer for it was yes (decisions not yet written count), or
        the upstream is one of `open_upstreams`. Sorted."""
        open_ = set(open_upstreams)
        async with self.db.execute(
            "SELECT DISTINCT l.upstream, l.repo, a.allowed FROM links l LEFT JOIN access a"
            " ON a.upstream = l.upstream AND a.repo = l.repo AND a.principal = ?",
            (principal,),
        ) as cur:
            rows = [(u, r, allowed) async for u, r, allowed in cur]
        readable = set()
        for upstream, repo, allowed in rows:
            pending = self._decisions.get((upstream, repo, principal))
            if upstream in open_ or (pending[0] if pending is not None else bool(allowed)):
                readable.add((upstream, repo))
        return sorted(readable)
