"""The index database's tables, its schema version, and upgrades in place from older versions.

Version history:
1. content, tags, links, access decisions, pins, hit counts.
2. descriptors: the sizes manifests give what they reference (filled in as they are needed).
3. access decisions are keyed by credential fingerprints under the data directory's secret key:
   decisions recorded for unsalted fingerprints can never match again, and must not be guessed
   at, so they are deleted (anonymous ones are kept).
"""
from __future__ import annotations

from pathlib import Path

import aiosqlite

SCHEMA_VERSION = 3
ANONYMOUS = "anonymous"  # the principal of requests without credentials
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


class SchemaTooNew(Exception):
    """The database was written by a newer version of the mirror."""


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the database at `path` (open as `db`) to SCHEMA_VERSION: create what is missing,
    upgrade an older one in place. Raises SchemaTooNew, touching nothing, for a newer one."""
    found = await _version(db)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNew(f"{path} has schema version {found}; this mirror understands up to {SCHEMA_VERSION}")
    await db.executescript(SCHEMA)  # creates the tables later versions added, too
    if found is None:
        await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
    elif found < SCHEMA_VERSION:
        if found < 3:
            await db.execute("DELETE FROM access WHERE principal != ?", (ANONYMOUS,))
        await db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
    await db.commit()


async def _version(db: aiosqlite.Connection) -> int | None:
    """The stored schema version; None for a new database."""
    async with db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'") as cur:
        if await cur.fetchone() is None:
            return None
    async with db.execute("SELECT version FROM schema_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else None
