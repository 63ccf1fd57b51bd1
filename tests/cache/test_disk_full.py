"""A full disk (a real, size-limited tmpfs) does not break pulls and leaves nothing half-written."""
from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.app import make_app
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.integration.registry import missing


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: mounting needs root, which CI has."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_during_a_fetch_passes_bytes_through(
    aiohttp_client, fake_registry: FakeRegistry, small_disk: Path  # type: ignore[no-untyped-def]
) -> None:
    assert fake_registry.url
    data_dir = small_disk / "data"
    app = make_app(mirror_config(fake_registry.url, data_dir), clock=FakeClock())
    mirror = Mirror(await aiohttp_client(app), FakeClock(), app, data_dir)
    big = os.urandom(5 << 20)
    digest = fake_registry.add_blob("library/big", big)
    hold = fake_registry.hold(digest, after=64 * 1024)  # all three join the fetch before the disk fills
    responses = await asyncio.wait_for(
        asyncio.gather(*(mirror.client.get(f"/v2/library/big/blobs/{digest}") for _ in range(3))), 10)
    hold.release()
    bodies = await asyncio.gather(*(r.read() for r in responses))
    await mirror.settled()
    assert bodies == [big] * 3
    assert fake_registry.count(method="GET", kind="blob") == 1
    store = mirror.services.blobs.store
    assert store.size(digest) is None
    assert list(store.tmp_dir.iterdir()) == []
    assert mirror.services.metrics.store_failures.labels("ENOSPC")._value.get() == 1
    small = os.urandom(100_000)
    small_digest = fake_registry.add_blob("library/big", small)
    assert await (await mirror.client.get(f"/v2/library/big/blobs/{small_digest}")).read() == small
    await mirror.settled()
    assert store.size(small_digest) == len(small)
