"""Access times, hit counts and access decisions: batched in memory, and never lost to a failed write."""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mirror.storage.metadata import Metadata
from tests.storage.metadata import D1, D2, read


class Faults:
    """Makes the connection's `executemany` (the n-th call of each flush, or every call) or `commit` raise."""

    def __init__(self, metadata: Metadata, monkeypatch: pytest.MonkeyPatch, method: str = "executemany") -> None:
        self.failing = False
        self.only_call: int | None = None  # fail just this call (1-based) of each flush
        self.error = sqlite3.OperationalError("database is locked")
        self.calls = 0
        original = getattr(metadata.db.connection, method)

        async def run(*args: Any) -> Any:
            self.calls += 1
            if self.failing and (self.only_call is None or self.calls == self.only_call):
                raise self.error
            return await original(*args)

        monkeypatch.setattr(metadata.db.connection, method, run)

    def start(self, only_call: int | None = None) -> None:
        self.failing, self.only_call, self.calls = True, only_call, 0


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mirror.metadata" and r.levelno == logging.ERROR]


async def test_access_times_are_batched(metadata: Metadata) -> None:
    await metadata.content.add(D1, 10, None, "blob", 100.0)
    await metadata.content.add(D2, 20, None, "blob", 100.0)
    for now in (150.0, 160.0, 170.0):
        metadata.content.touch([D1], now)
    metadata.content.touch([D2], 50.0)  # older than what is stored: must not go back in time
    assert read(metadata.path, "SELECT digest, last_access FROM content ORDER BY digest") == [
        (D1, 100.0), (D2, 100.0)]  # nothing written yet
    assert await metadata.flush()
    assert read(metadata.path, "SELECT digest, last_access FROM content ORDER BY digest") == [
        (D1, 170.0), (D2, 100.0)]
    assert await metadata.flush()  # nothing pending: no-op


async def test_close_flushes_pending_access_times(tmp_path: Path) -> None:
    md = Metadata(tmp_path / "index.db")
    await md.open()
    await md.content.add(D1, 10, None, "blob", 100.0)
    md.content.touch([D1], 500.0)
    await md.close()
    assert read(tmp_path / "index.db", "SELECT last_access FROM content") == [(500.0,)]


async def test_a_failed_write_is_kept_and_merged_with_what_came_meanwhile(
        metadata: Metadata, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    await metadata.content.add(D1, 10, None, "blob", 100.0)
    await metadata.content.add(D2, 20, None, "blob", 100.0)
    caplog.set_level(logging.INFO, "mirror.metadata")
    faults = Faults(metadata, monkeypatch)
    faults.start()
    metadata.content.touch([D1], 150.0)
    metadata.stats.count_hit("docker.io", "library/app")
    metadata.stats.count_hit("docker.io", "library/app")
    metadata.access.record("docker.io", "library/app", "anonymous", False, 100.0, "unauthorized")
    assert not await metadata.flush()
    # meanwhile
    metadata.content.touch([D1], 120.0)  # earlier than the kept one: the latest wins
    metadata.content.touch([D2], 300.0)
    metadata.stats.count_hit("docker.io", "library/app")
    metadata.stats.count_hit("ghcr.io", "org/tool")
    metadata.access.record("docker.io", "library/app", "anonymous", True, 200.0, "")
    assert not await metadata.flush()
    assert not await metadata.flush()
    assert await metadata.access.get("docker.io", "library/app", "anonymous") == (True, 200.0, "")
    assert len(_failures(caplog)) == 1 and "database is locked" in _failures(caplog)[0]  # once per streak
    assert read(metadata.path, "SELECT * FROM hits") == [] and read(metadata.path, "SELECT * FROM access") == []

    faults.failing = False
    assert await metadata.flush()
    assert read(metadata.path, "SELECT digest, last_access FROM content ORDER BY digest") == [(D1, 150.0), (D2, 300.0)]
    assert sorted(read(metadata.path, "SELECT * FROM hits")) == [
        ("docker.io", "library/app", 3), ("ghcr.io", "org/tool", 1)]
    assert read(metadata.path, "SELECT allowed, decided_at, message FROM access") == [(1, 200.0, "")]
    assert any("written again" in r.getMessage() for r in caplog.records)

    faults.start()  # a new streak is logged again
    metadata.stats.count_hit("docker.io", "library/app")
    assert not await metadata.flush()
    assert len(_failures(caplog)) == 2


async def test_a_write_failing_midway_counts_nothing_twice(
        metadata: Metadata, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = Faults(metadata, monkeypatch)
    faults.start(only_call=3)  # after the hit counts were added, before the decisions: all of it is undone
    metadata.stats.count_hit("docker.io", "library/app")
    metadata.stats.count_hit("docker.io", "library/app")
    assert not await metadata.flush()
    assert read(metadata.path, "SELECT * FROM hits") == []
    faults.failing = False
    assert await metadata.flush()
    assert read(metadata.path, "SELECT * FROM hits") == [("docker.io", "library/app", 2)]


async def test_a_failed_commit_keeps_the_batch(metadata: Metadata, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = Faults(metadata, monkeypatch, method="commit")
    faults.error = sqlite3.OperationalError("database or disk is full")
    await metadata.content.add(D1, 10, None, "blob", 100.0)
    faults.start()
    metadata.content.touch([D1], 150.0)
    metadata.stats.count_hit("docker.io", "library/app")
    assert not await metadata.flush()
    faults.failing = False
    assert await metadata.flush()
    assert read(metadata.path, "SELECT last_access FROM content") == [(150.0,)]
    assert read(metadata.path, "SELECT * FROM hits") == [("docker.io", "library/app", 1)]
