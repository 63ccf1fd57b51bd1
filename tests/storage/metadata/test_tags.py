"""Tags: stored, replaced, dropped, and answered from memory only while fresh."""
from __future__ import annotations

from pathlib import Path

from mirror.storage.metadata import Metadata, TagRow
from tests.storage.metadata import D1, D2, MANIFEST, read


async def test_tags_put_get_replace_and_persist(metadata: Metadata, tmp_path: Path) -> None:
    assert await metadata.tags.get("docker.io", "library/app", "latest") is None
    row = TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0)
    await metadata.tags.put(row)
    assert await metadata.tags.get("docker.io", "library/app", "latest") == row
    assert await metadata.tags.get("ghcr.io", "library/app", "latest") is None
    assert await metadata.tags.get("docker.io", "library/app", "other") is None
    moved = TagRow("docker.io", "library/app", "latest", D2, MANIFEST, 800.0, 1400.0)
    await metadata.tags.put(moved)
    assert await metadata.tags.get("docker.io", "library/app", "latest") == moved
    assert read(metadata.path, "SELECT digest, expires_at FROM tags") == [(D2, 1400.0)]
    await metadata.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    try:
        assert await reopened.tags.get("docker.io", "library/app", "latest") == moved
    finally:
        await reopened.close()


async def test_an_expired_tag_is_read_again_for_what_another_process_wrote(metadata: Metadata) -> None:
    other = Metadata(metadata.path)  # another worker process's connection to the same database
    await other.open()
    try:
        await metadata.tags.put(TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0))
        revalidated = TagRow("docker.io", "library/app", "latest", D2, MANIFEST, 800.0, 1400.0)
        await other.tags.put(revalidated)
        assert (await metadata.tags.get("docker.io", "library/app", "latest", now=600.0)).digest == D1  # type: ignore[union-attr]
        assert await metadata.tags.get("docker.io", "library/app", "latest", now=800.0) == revalidated
    finally:
        await other.close()


async def test_drop(metadata: Metadata) -> None:
    await metadata.tags.put(TagRow("docker.io", "library/app", "latest", D1, MANIFEST, 100.0, 700.0))
    await metadata.tags.drop("docker.io", "library/app", "latest")
    assert await metadata.tags.get("docker.io", "library/app", "latest") is None
    assert read(metadata.path, "SELECT * FROM tags") == []
