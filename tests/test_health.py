"""/healthz and /readyz: alive, and ready only with a writable data directory and an open database."""
from __future__ import annotations

import os


from tests.conftest import Mirror


async def test_healthz_and_readyz_when_all_is_well(mirror: Mirror) -> None:
    assert (await mirror.client.get("/healthz")).status == 200
    resp = await mirror.client.get("/readyz")
    assert resp.status == 200 and await resp.text() == "ready\n"
    assert list(mirror.services.blobs.store.tmp_dir.iterdir()) == []  # the probe file is gone


async def test_not_ready_when_the_data_directory_is_gone(mirror: Mirror) -> None:
    store = mirror.services.blobs.store
    os.rmdir(store.tmp_dir)
    resp = await mirror.client.get("/readyz")
    assert resp.status == 503 and "not writable" in await resp.text()
    assert (await mirror.client.get("/healthz")).status == 200
    store.tmp_dir.mkdir()
    assert (await mirror.client.get("/readyz")).status == 200


async def test_not_ready_when_the_database_is_closed(mirror: Mirror) -> None:
    metadata = mirror.services.manifests.metadata
    await metadata.close()
    resp = await mirror.client.get("/readyz")
    assert resp.status == 503 and "database is not open" in await resp.text()
    await metadata.open()
    assert (await mirror.client.get("/readyz")).status == 200


async def test_cache_gauges_come_from_the_index_and_the_evictor_cap(mirror: Mirror) -> None:
    text = await (await mirror.client.get("/metrics")).text()
    assert "\nmirror_cache_size_bytes 0.0\n" in text
    assert 'mirror_cache_objects{kind="blob"} 0.0' in text
    assert "\nmirror_cache_max_bytes " in text
