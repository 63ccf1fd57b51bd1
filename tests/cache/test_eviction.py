"""The size cap: least-recently-used images leave whole, pinned ones never, nothing in flight breaks."""
from __future__ import annotations

from pathlib import Path

import pytest

from mirror.app import make_app
from mirror.cache.eviction import Evictor, cap_bytes
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry, Image
from tests.proxy.test_manifests import ACCEPT

LAYER = 100_000


@pytest.fixture
async def small_mirror(aiohttp_client, fake_registry: FakeRegistry, tmp_path: Path) -> Mirror:  # type: ignore[no-untyped-def]
    """A mirror whose cache holds about three of the test images (cap 1 MB)."""
    assert fake_registry.url
    clock = FakeClock()
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", max_size="1MB"), clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")


def evictor(mirror: Mirror) -> Evictor:
    svc = mirror.services
    return Evictor(svc.blobs.store, svc.blobs.metadata, svc.metrics, lambda: 1_000_000, svc.manifests.forget)


async def pull(mirror: Mirror, repo: str, image: Image) -> None:
    assert (await mirror.client.get(f"/v2/{repo}/manifests/1", headers=ACCEPT)).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        resp = await mirror.client.get(f"/v2/{repo}/blobs/{digest}")
        assert resp.status == 200
        await resp.read()
    await mirror.settled()
    await mirror.services.blobs.metadata.flush()


def cached(mirror: Mirror, image: Image) -> set[bool]:
    store = mirror.services.blobs.store
    return {store.size(d) is not None for d in (image.digest, image.config_digest, *image.layer_digests)}


def test_cap_in_bytes_or_share_of_disk(tmp_path: Path) -> None:
    assert cap_bytes("200GiB", tmp_path) == 200 << 30
    assert 0 < cap_bytes("50%", tmp_path) < cap_bytes("100%", tmp_path)


async def test_least_recently_used_images_leave_whole(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    images = {}
    for n in range(5):  # 5 images × 3 × 100 kB = 1.5 MB against a 1 MB cap
        images[n] = fake_registry.add_image(f"library/app{n}", "1", [bytes([n]) * LAYER + bytes([m]) for m in range(3)])
        await pull(small_mirror, f"library/app{n}", images[n])
        small_mirror.clock.advance(10)
    await pull(small_mirror, "library/app0", images[0])  # app0 is now the most recently used
    removed, freed = await evictor(small_mirror).evict()
    assert removed and freed >= 500_000
    metadata = small_mirror.services.blobs.metadata
    assert metadata.size <= 900_000
    for n in range(5):
        assert len(cached(small_mirror, images[n])) == 1, f"image {n} was cut in half"
    assert cached(small_mirror, images[0]) == {True}
    assert cached(small_mirror, images[4]) == {True}
    assert cached(small_mirror, images[1]) == {False}
    metrics = small_mirror.services.metrics
    assert metrics.evictions._value.get() == removed
    assert metrics.evicted_bytes._value.get() == freed
    # an evicted image pulls again, from upstream
    fake_registry.reset_counts()
    await pull(small_mirror, "library/app1", images[1])
    assert fake_registry.count(method="GET", kind="blob") == 4


async def test_pinned_images_are_never_evicted(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    images = {}
    for n in range(5):
        images[n] = fake_registry.add_image(f"library/app{n}", "1", [bytes([n]) * LAYER + bytes([m]) for m in range(3)])
        await pull(small_mirror, f"library/app{n}", images[n])
        small_mirror.clock.advance(10)
    metadata = small_mirror.services.blobs.metadata
    await metadata.add_pin("docker.io", "library/app0", "1")
    await metadata.add_pin("docker.io", "library/app1", images[1].digest)
    await evictor(small_mirror).evict()
    assert cached(small_mirror, images[0]) == {True}
    assert cached(small_mirror, images[1]) == {True}
    assert cached(small_mirror, images[2]) == {False}


async def test_index_parts_age_together(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    amd = fake_registry.add_image("library/multi", None, [b"a" * LAYER])
    arm = fake_registry.add_image("library/multi", None, [b"b" * LAYER], platform="linux/arm64")
    index = fake_registry.add_index("library/multi", "1", [amd, arm])
    for m in (index, amd, arm):
        await small_mirror.client.get(f"/v2/library/multi/manifests/{m.digest}", headers=ACCEPT)
    for image in (amd, arm):
        for d in (image.config_digest, *image.layer_digests):
            await (await small_mirror.client.get(f"/v2/library/multi/blobs/{d}")).read()
    await small_mirror.settled()
    small_mirror.clock.advance(100)
    await small_mirror.client.get("/v2/library/multi/manifests/1", headers=ACCEPT)
    await small_mirror.services.blobs.metadata.flush()
    rows = await small_mirror.services.blobs.metadata.content_usage()
    times = {d: at for d, _size, _kind, at in rows}
    parts = [index.digest, amd.digest, arm.digest, amd.layer_digests[0], arm.config_digest]
    assert len({times[d] for d in parts}) == 1, "serving the index must bump every part of it"


async def test_serving_survives_eviction_of_the_file_being_sent(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob("library/big", b"z" * 900_000)
    await (await small_mirror.client.get(f"/v2/library/big/blobs/{digest}")).read()
    await small_mirror.settled()
    resp = await small_mirror.client.get(f"/v2/library/big/blobs/{digest}")
    await resp.content.readexactly(1000)
    await evictor(small_mirror).evict(force=True)
    assert small_mirror.services.blobs.store.size(digest) is None
    assert len(await resp.read()) == 900_000 - 1000


async def test_a_layer_shared_with_a_recent_image_stays(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    base = b"base" * (LAYER // 4)
    old = fake_registry.add_image("library/old", "1", [base, b"o" * 300_000])
    new = fake_registry.add_image("library/new", "1", [base, b"n" * 300_000])
    filler = fake_registry.add_image("library/filler", "1", [b"f" * 400_000])
    await pull(small_mirror, "library/old", old)
    small_mirror.clock.advance(10)
    await pull(small_mirror, "library/filler", filler)
    small_mirror.clock.advance(10)
    await pull(small_mirror, "library/new", new)
    await evictor(small_mirror).evict()
    assert cached(small_mirror, old) == {False, True}  # its own layer went, the shared one stayed
    assert cached(small_mirror, new) == {True}
    assert small_mirror.services.blobs.store.size(old.layer_digests[1]) is None
