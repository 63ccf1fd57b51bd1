"""Metadata on a real SQLite file: WAL, tags, links, batched access times, schema versions."""
from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.storage.metadata import SCHEMA_VERSION, ContentRow, Metadata, SchemaTooNew, TagRow

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def metadata(tmp_path: Path) -> AsyncIterator[Metadata]:
    md = Metadata(tmp_path / "index.db")
    await md.open()
    yield md
    await md.close()


def _read(path: Path, sql: str, *args: object) -> list[tuple]:  # type: ignore[type-arg]
    """What another process would see on disk, bypassing every in-memory cache."""
    with sqlite3.connect(path) as db:
        return db.execute(sql, args).fetchall()


async def test_wal_mode_and_schema_version(metadata: Metadata) -> None:
    async with metadata.db.execute("PRAGMA journal_mode") as cur:
        assert await cur.fetchone() == ("wal",)
    assert _read(metadata.path, "PRAGMA journal_mode") == [("wal",)]
    assert _read(metadata.path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_tags_put_get_replace_and_persist(metadata: Metadata, tmp_path: Path) -> None:
    assert await metadata.get_tag("docker.io", "library/app", "latest") is None
    row = TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0)
    await metadata.put_tag(row)
    assert await metadata.get_tag("docker.io", "library/app", "latest") == row
    assert await metadata.get_tag("ghcr.io", "library/app", "latest") is None
    assert await metadata.get_tag("docker.io", "library/app", "other") is None
    moved = TagRow("docker.io", "library/app", "latest", D2, MANIFEST, 800.0, 1400.0)
    await metadata.put_tag(moved)
    assert await metadata.get_tag("docker.io", "library/app", "latest") == moved
    assert _read(metadata.path, "SELECT digest, expires_at FROM tags") == [(D2, 1400.0)]
    await metadata.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    try:
        assert await reopened.get_tag("docker.io", "library/app", "latest") == moved
    finally:
        await reopened.close()


async def test_links(metadata: Metadata, tmp_path: Path) -> None:
    assert not await metadata.is_linked("docker.io", "library/app", D1)
    await metadata.link("docker.io", "library/app", [D1, D2, D1])
    await metadata.link("docker.io", "library/app", [D1])  # again: nothing new, no error
    assert await metadata.is_linked("docker.io", "library/app", D1)
    assert await metadata.is_linked("docker.io", "library/app", D2)
    assert not await metadata.is_linked("docker.io", "library/other", D1)
    assert not await metadata.is_linked("ghcr.io", "library/app", D1)
    assert sorted(_read(metadata.path, "SELECT digest FROM links")) == [(D1,), (D2,)]
    await metadata.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    try:
        assert await reopened.is_linked("docker.io", "library/app", D2)
        assert not await reopened.is_linked("docker.io", "library/other", D2)
    finally:
        await reopened.close()


async def test_content_rows(metadata: Metadata) -> None:
    assert await metadata.get_content(D1) is None
    await metadata.add_content(D1, 10, None, "blob", 100.0)
    await metadata.add_content(D1, 10, MANIFEST, "manifest", 200.0)  # a later add fills a missing type
    await metadata.add_content(D2, 20, MANIFEST, "manifest", 100.0)
    await metadata.add_content(D2, 20, "other/type", "manifest", 300.0)  # but never replaces one
    assert await metadata.get_content(D1) == ContentRow(D1, 10, MANIFEST, "blob")
    assert await metadata.get_content(D2) == ContentRow(D2, 20, MANIFEST, "manifest")
    assert await metadata.all_content() == {D1: 10, D2: 20}


async def test_access_times_are_batched(metadata: Metadata) -> None:
    await metadata.add_content(D1, 10, None, "blob", 100.0)
    await metadata.add_content(D2, 20, None, "blob", 100.0)
    for now in (150.0, 160.0, 170.0):
        metadata.touch(D1, now)
    metadata.touch(D2, 50.0)  # older than what is stored: must not go back in time
    assert _read(metadata.path, "SELECT digest, last_access FROM content ORDER BY digest") == [
        (D1, 100.0), (D2, 100.0)]  # nothing written yet
    await metadata.flush()
    assert _read(metadata.path, "SELECT digest, last_access FROM content ORDER BY digest") == [
        (D1, 170.0), (D2, 100.0)]
    await metadata.flush()  # nothing pending: no-op


async def test_hit_counts_from_several_processes_add_up(metadata: Metadata, tmp_path: Path) -> None:
    other = Metadata(metadata.path)  # another worker process's connection to the same database
    await other.open()
    try:
        for _ in range(3):
            metadata.count_hit("docker.io", "library/app")
        metadata.count_hit("ghcr.io", "org/tool")
        other.count_hit("docker.io", "library/app")
        assert await metadata.top_hits(10) == []  # counted in memory until the flush
        await metadata.flush()
        await other.flush()
        assert await metadata.top_hits(10) == [("docker.io", "library/app", 4), ("ghcr.io", "org/tool", 1)]
        assert await metadata.top_hits(1) == [("docker.io", "library/app", 4)]
        await metadata.forget_repository("docker.io", "library/app")
        assert await other.top_hits(10) == [("ghcr.io", "org/tool", 1)]
    finally:
        await other.close()


async def test_a_burst_of_identical_reads_costs_one_query(metadata: Metadata) -> None:
    await metadata.add_content(D1, 10, MANIFEST, "manifest", 100.0)
    queries: list[str] = []
    await metadata.db.set_trace_callback(queries.append)
    rows = await asyncio.gather(*(metadata.get_content(D1) for _ in range(20)),
                                *(metadata.get_access("docker.io", "library/app", "anonymous") for _ in range(20)))
    assert rows[:20] == [ContentRow(D1, 10, MANIFEST, "manifest")] * 20 and rows[20:] == [None] * 20
    assert len([q for q in queries if q.startswith("SELECT")]) == 2
    await metadata.get_content(D1)  # later reads query again: nothing is cached by this
    assert len([q for q in queries if q.startswith("SELECT")]) == 3


async def test_close_flushes_pending_access_times(tmp_path: Path) -> None:
    md = Metadata(tmp_path / "index.db")
    await md.open()
    await md.add_content(D1, 10, None, "blob", 100.0)
    md.touch(D1, 500.0)
    await md.close()
    assert _read(tmp_path / "index.db", "SELECT last_access FROM content") == [(500.0,)]


async def test_drop_content_removes_rows_links_and_tags(metadata: Metadata) -> None:
    await metadata.add_content(D1, 10, MANIFEST, "manifest", 100.0)
    await metadata.add_content(D2, 20, None, "blob", 100.0)
    await metadata.link("docker.io", "library/app", [D1, D2])
    await metadata.put_tag(TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0))
    assert await metadata.get_tag("docker.io", "library/app", "latest") is not None  # now cached in memory
    await metadata.drop_content([D1])
    assert await metadata.get_content(D1) is None
    assert not await metadata.is_linked("docker.io", "library/app", D1)
    assert await metadata.get_tag("docker.io", "library/app", "latest") is None
    assert await metadata.is_linked("docker.io", "library/app", D2)
    assert await metadata.all_content() == {D2: 20}


async def test_schema_too_new_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    md = Metadata(path)
    await md.open()
    await md.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    newer = Metadata(path)
    with pytest.raises(SchemaTooNew) as info:
        await newer.open()
    message = str(info.value)
    assert str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"understands up to {SCHEMA_VERSION}" in message
    assert newer._db is None  # the connection was closed, not leaked
    assert _read(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION + 1,)]  # left as it was
