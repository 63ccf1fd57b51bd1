"""Hit counts, usage, and pins."""
from __future__ import annotations

from pathlib import Path

from mirror.metrics import CacheUsage
from mirror.storage.metadata import Metadata
from tests.storage.metadata import D1, D2, MANIFEST


async def test_hit_counts_from_several_processes_add_up(metadata: Metadata) -> None:
    other = Metadata(metadata.path)  # another worker process's connection to the same database
    await other.open()
    try:
        for _ in range(3):
            metadata.stats.count_hit("docker.io", "library/app")
        metadata.stats.count_hit("ghcr.io", "org/tool")
        other.stats.count_hit("docker.io", "library/app")
        assert await metadata.stats.top_hits(10) == []  # counted in memory until the flush
        await metadata.flush()
        await other.flush()
        assert await metadata.stats.top_hits(10) == [("docker.io", "library/app", 4), ("ghcr.io", "org/tool", 1)]
        assert await metadata.stats.top_hits(1) == [("docker.io", "library/app", 4)]
        await metadata.forget_repository("docker.io", "library/app")
        assert await other.stats.top_hits(10) == [("ghcr.io", "org/tool", 1)]
    finally:
        await other.close()


async def test_usage(metadata: Metadata) -> None:
    assert await metadata.stats.usage_by_kind() == {}
    assert await metadata.stats.oldest_access() is None
    assert metadata.stats.read_usage() == CacheUsage(0, {})
    await metadata.content.add(D1, 10, MANIFEST, "manifest", 100.0)
    await metadata.content.add(D2, 20, None, "blob", 50.0)
    await metadata.links.add("docker.io", "library/app", [D1, D2])
    await metadata.links.add("docker.io", "library/other", [D2])
    assert await metadata.stats.usage_by_kind() == {"manifest": (1, 10), "blob": (1, 20)}
    assert await metadata.stats.oldest_access() == 50.0
    assert await metadata.stats.repositories_by_size(10) == [
        ("docker.io", "library/app", 30), ("docker.io", "library/other", 20)]
    assert await metadata.stats.repositories_by_size(1) == [("docker.io", "library/app", 30)]
    assert metadata.stats.read_usage() == CacheUsage(30, {"manifest": 1, "blob": 1})


async def test_no_database_no_usage(tmp_path: Path) -> None:
    assert Metadata(tmp_path / "absent.db").stats.read_usage() is None
    (tmp_path / "junk.db").write_bytes(b"not a database at all, just some bytes" * 10)
    assert Metadata(tmp_path / "junk.db").stats.read_usage() is None


async def test_pins(metadata: Metadata) -> None:
    assert await metadata.pins.all() == []
    await metadata.pins.add("docker.io", "library/app", "1")
    await metadata.pins.add("docker.io", "library/app", "1")  # again: no error
    await metadata.pins.add("docker.io", "library/app", D1)
    assert await metadata.pins.all() == [("docker.io", "library/app", "1"), ("docker.io", "library/app", D1)]
    assert await metadata.pins.remove("docker.io", "library/app", "1")
    assert not await metadata.pins.remove("docker.io", "library/app", "1")
    assert await metadata.pins.all() == [("docker.io", "library/app", D1)]
