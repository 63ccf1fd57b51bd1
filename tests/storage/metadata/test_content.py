"""Content rows, links and descriptors, and what goes when content goes."""
from __future__ import annotations

import asyncio
from pathlib import Path

from mirror.storage.metadata import ContentRow, Metadata, TagRow
from tests.storage.metadata import D1, D2, MANIFEST, read


async def test_content_rows(metadata: Metadata) -> None:
    assert await metadata.content.get(D1) is None
    await metadata.content.add(D1, 10, None, "blob", 100.0)
    await metadata.content.add(D1, 10, MANIFEST, "manifest", 200.0)  # a later add fills a missing type
    await metadata.content.add(D2, 20, MANIFEST, "manifest", 100.0)
    await metadata.content.add(D2, 20, "other/type", "manifest", 300.0)  # but never replaces one
    assert await metadata.content.get(D1) == ContentRow(D1, 10, MANIFEST, "blob")
    assert await metadata.content.get(D2) == ContentRow(D2, 20, MANIFEST, "manifest")
    assert await metadata.content.sizes() == {D1: 10, D2: 20}
    assert await metadata.content.kind(D1) == "blob" and await metadata.content.kind("sha256:" + "9" * 64) is None


async def test_size_follows_rows_and_new_rows_call_on_grown(tmp_path: Path) -> None:
    grown: list[int] = []
    md = Metadata(tmp_path / "index.db", on_grown=lambda: grown.append(md.content.size))
    await md.open()
    try:
        await md.content.add(D1, 10, None, "blob", 100.0)
        await md.content.add(D1, 10, None, "blob", 200.0)  # known: no growth
        await md.content.add(D2, 20, None, "blob", 100.0)
        assert grown == [10, 30] and md.content.size == 30
        await md.drop_content([D1])
        assert md.content.size == 20
    finally:
        await md.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    assert reopened.content.size == 20
    await reopened.close()


async def test_links(metadata: Metadata, tmp_path: Path) -> None:
    assert not await metadata.links.contains("docker.io", "library/app", D1)
    await metadata.links.add("docker.io", "library/app", [D1, D2, D1])
    await metadata.links.add("docker.io", "library/app", [D1])  # again: nothing new, no error
    assert await metadata.links.contains("docker.io", "library/app", D1)
    assert await metadata.links.contains("docker.io", "library/app", D2)
    assert not await metadata.links.contains("docker.io", "library/other", D1)
    assert not await metadata.links.contains("ghcr.io", "library/app", D1)
    assert sorted(read(metadata.path, "SELECT digest FROM links")) == [(D1,), (D2,)]
    await metadata.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    try:
        assert await reopened.links.contains("docker.io", "library/app", D2)
        assert not await reopened.links.contains("docker.io", "library/other", D2)
    finally:
        await reopened.close()


async def test_digests_of_a_repository_split_by_sharing(metadata: Metadata) -> None:
    await metadata.links.add("docker.io", "library/app", [D1, D2])
    await metadata.links.add("docker.io", "library/other", [D2])
    assert await metadata.links.of_repository("docker.io", "library/app") == ({D1}, {D2})


async def test_a_burst_of_identical_reads_costs_one_query(metadata: Metadata) -> None:
    await metadata.content.add(D1, 10, MANIFEST, "manifest", 100.0)
    queries: list[str] = []
    await metadata.db.connection.set_trace_callback(queries.append)
    rows = await asyncio.gather(*(metadata.content.get(D1) for _ in range(20)),
                                *(metadata.access.get("docker.io", "library/app", "anonymous") for _ in range(20)))
    assert rows[:20] == [ContentRow(D1, 10, MANIFEST, "manifest")] * 20 and rows[20:] == [None] * 20
    assert len([q for q in queries if q.startswith("SELECT")]) == 2
    await metadata.content.get(D1)  # later reads query again: nothing is cached by this
    assert len([q for q in queries if q.startswith("SELECT")]) == 3


async def test_drop_content_removes_rows_links_tags_and_descriptors(metadata: Metadata) -> None:
    await metadata.content.add(D1, 10, MANIFEST, "manifest", 100.0)
    await metadata.content.add(D2, 20, None, "blob", 100.0)
    await metadata.links.add("docker.io", "library/app", [D1, D2])
    await metadata.descriptors.add(D1, {D1: 10, D2: 20})
    await metadata.tags.put(TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0))
    assert await metadata.tags.get("docker.io", "library/app", "latest") is not None  # now cached in memory
    await metadata.drop_content([D1])
    assert await metadata.content.get(D1) is None
    assert not await metadata.links.contains("docker.io", "library/app", D1)
    assert await metadata.tags.get("docker.io", "library/app", "latest") is None
    assert await metadata.links.contains("docker.io", "library/app", D2)
    assert await metadata.content.sizes() == {D2: 20}
    assert read(metadata.path, "SELECT * FROM descriptors") == []


async def test_forget_repository_keeps_content(metadata: Metadata) -> None:
    await metadata.content.add(D1, 10, MANIFEST, "manifest", 100.0)
    await metadata.links.add("docker.io", "library/app", [D1])
    await metadata.tags.put(TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0))
    metadata.access.record("docker.io", "library/app", "anonymous", True, 100.0, "")
    metadata.stats.count_hit("docker.io", "library/app")
    await metadata.flush()
    await metadata.forget_repository("docker.io", "library/app")
    assert not await metadata.links.contains("docker.io", "library/app", D1)
    assert await metadata.tags.get("docker.io", "library/app", "latest") is None
    assert await metadata.access.get("docker.io", "library/app", "anonymous") is None
    assert await metadata.stats.top_hits(10) == []
    assert await metadata.content.get(D1) is not None
