"""Access decisions: answered from memory at once, written in the background, listed for the catalog."""
from __future__ import annotations

from pathlib import Path

from mirror.storage.metadata import Metadata
from tests.storage.metadata import D1, D2, read


async def test_a_decision_is_answered_at_once_and_written_soon(metadata: Metadata) -> None:
    assert await metadata.access.get("docker.io", "library/app", "anonymous") is None
    metadata.access.record("docker.io", "library/app", "anonymous", False, 100.0, "unauthorized")
    assert await metadata.access.get("docker.io", "library/app", "anonymous") == (False, 100.0, "unauthorized")
    await metadata.flush()  # waits for the background write, if it is still running
    assert read(metadata.path, "SELECT allowed, decided_at, message FROM access") == [(0, 100.0, "unauthorized")]
    metadata.access.record("docker.io", "library/app", "anonymous", True, 200.0, "")
    await metadata.flush()
    assert read(metadata.path, "SELECT allowed, decided_at FROM access") == [(1, 200.0)]


async def test_decisions_are_per_principal(metadata: Metadata, tmp_path: Path) -> None:
    metadata.access.record("docker.io", "org/private", "a" * 64, True, 100.0, "")
    await metadata.close()
    reopened = Metadata(tmp_path / "index.db")
    await reopened.open()
    try:
        assert await reopened.access.get("docker.io", "org/private", "a" * 64) == (True, 100.0, "")
        assert await reopened.access.get("docker.io", "org/private", "b" * 64) is None
        assert await reopened.access.get("docker.io", "org/private", "anonymous") is None
    finally:
        await reopened.close()


async def test_readable_repositories(metadata: Metadata) -> None:
    await metadata.links.add("docker.io", "library/app", [D1])
    await metadata.links.add("docker.io", "org/private", [D2])
    await metadata.links.add("ghcr.io", "org/tool", [D1])
    await metadata.links.add("quay.io", "org/open", [D1])
    metadata.access.record("docker.io", "library/app", "anonymous", True, 100.0, "")
    metadata.access.record("docker.io", "org/private", "anonymous", False, 100.0, "")
    await metadata.flush()
    metadata.access.record("ghcr.io", "org/tool", "anonymous", True, 100.0, "")  # not written yet: counts too
    assert await metadata.access.readable_repositories("anonymous", ["quay.io"]) == [
        ("docker.io", "library/app"), ("ghcr.io", "org/tool"), ("quay.io", "org/open")]
    assert await metadata.access.readable_repositories("a" * 64, []) == []
