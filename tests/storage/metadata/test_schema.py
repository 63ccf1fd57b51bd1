"""The database file: WAL, its schema version, upgrades in place, and refusal of a newer one."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mirror.storage.metadata import SCHEMA_VERSION, Metadata, SchemaTooNew
from mirror.storage.metadata.schema import SCHEMA
from tests.storage.metadata import D1, D2, read

FINGERPRINT = "3f2a9c0d11e84b7a"  # how a credential was named before fingerprints had a key


async def test_wal_mode_and_schema_version(metadata: Metadata) -> None:
    async with metadata.db.connection.execute("PRAGMA journal_mode") as cur:
        assert await cur.fetchone() == ("wal",)
    assert read(metadata.path, "PRAGMA journal_mode") == [("wal",)]
    assert read(metadata.path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 3


def _version_2(path: Path) -> None:
    """A database as version 2 left it (the same tables), with decisions for anonymous and for credentials."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO schema_version VALUES (2)")
        db.executemany("INSERT INTO access VALUES (?, ?, ?, ?, ?, ?)", [
            ("docker.io", "library/app", "anonymous", 1, 100.0, ""),
            ("docker.io", "library/app", FINGERPRINT, 1, 100.0, ""),
            ("docker.io", "org/private", FINGERPRINT, 0, 100.0, "denied"),
            ("ghcr.io", "org/tool", "anonymous", 0, 100.0, "unauthorized"),
        ])
        db.execute("INSERT INTO content VALUES (?, 5, NULL, 'blob', 1, 1, 0)", (D1,))
        db.execute("INSERT INTO links VALUES ('docker.io', 'library/app', ?)", (D1,))


async def test_a_version_2_database_keeps_only_anonymous_access_decisions(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    _version_2(path)
    metadata = Metadata(path)
    await metadata.open()
    try:
        assert await metadata.access.get("docker.io", "library/app", "anonymous") == (True, 100.0, "")
        assert await metadata.access.get("ghcr.io", "org/tool", "anonymous") == (False, 100.0, "unauthorized")
        assert await metadata.access.get("docker.io", "library/app", FINGERPRINT) is None
        assert await metadata.links.contains("docker.io", "library/app", D1)  # nothing else goes
        assert metadata.content.size == 5
    finally:
        await metadata.close()
    assert read(path, "SELECT version FROM schema_version") == [(3,)]
    assert sorted(read(path, "SELECT upstream, repo, principal FROM access")) == [
        ("docker.io", "library/app", "anonymous"), ("ghcr.io", "org/tool", "anonymous")]
    reopened = Metadata(path)  # at version 3 now: decisions recorded since are kept
    await reopened.open()
    reopened.access.record("docker.io", "org/private", "a" * 64, True, 200.0, "")
    await reopened.close()
    await reopened.open()
    assert await reopened.access.get("docker.io", "org/private", "a" * 64) == (True, 200.0, "")
    await reopened.close()


async def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with sqlite3.connect(path) as db:  # the shape version 1 left: no descriptors
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("CREATE TABLE content (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,"
                   " kind TEXT NOT NULL, created_at REAL NOT NULL, last_access REAL NOT NULL,"
                   " pinned INTEGER NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO content VALUES (?, 5, NULL, 'blob', 1, 1, 0)", (D1,))
        db.execute("CREATE TABLE access (upstream TEXT NOT NULL, repo TEXT NOT NULL, principal TEXT NOT NULL,"
                   " allowed INTEGER NOT NULL, decided_at REAL NOT NULL, message TEXT NOT NULL DEFAULT '',"
                   " PRIMARY KEY (upstream, repo, principal))")
        db.execute("INSERT INTO access VALUES ('docker.io', 'library/app', 'anonymous', 1, 1, '')")
        db.execute("INSERT INTO access VALUES ('docker.io', 'library/app', ?, 1, 1, '')", (FINGERPRINT,))
    metadata = Metadata(path)
    await metadata.open()
    assert await metadata.content.get(D1) is not None and metadata.content.size == 5
    await metadata.descriptors.add(D2, {D1: 5})
    await metadata.close()
    assert read(path, "SELECT version FROM schema_version") == [(3,)]
    assert read(path, "SELECT * FROM descriptors") == [(D2, D1, 5)]
    assert read(path, "SELECT principal FROM access") == [("anonymous",)]


async def test_schema_too_new_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    md = Metadata(path)
    await md.open()
    await md.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        db.execute("DROP TABLE pins")  # a newer version's business
    newer = Metadata(path)
    with pytest.raises(SchemaTooNew) as info:
        await newer.open()
    message = str(info.value)
    assert str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"understands up to {SCHEMA_VERSION}" in message
    assert not newer.db.is_open  # the connection was closed, not leaked
    assert read(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION + 1,)]  # left as it was
    assert read(path, "SELECT name FROM sqlite_master WHERE name='pins'") == []  # nothing created
