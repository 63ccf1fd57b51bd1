"""The size cap: least-recently-used images leave whole, pinned ones never, nothing in flight breaks,
and writes that cross the cap evict at once (no timer): the data directory stays within the cap
plus what the running fetches are writing."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from mirror.adminapi import ADMIN
from mirror.app import make_app
from mirror.cache import eviction
from mirror.cache.eviction import Evictor, cap_bytes, plan_images
from mirror.storage.filestore import FileStore
from tests.conftest import FakeClock, Mirror, after_local_eviction, mirror_config
from tests.fakes.registry import OCI_MANIFEST, FakeRegistry, Image, digest_of
from tests.proxy.test_manifests import ACCEPT

CAP = 1_000_000
LAYER = 100_000


@pytest.fixture
async def small_mirror(aiohttp_client, fake_registry: FakeRegistry, tmp_path: Path,  # type: ignore[no-untyped-def]
                       monkeypatch: pytest.MonkeyPatch) -> Mirror:
    """A mirror whose cache holds about four of the two-layer test images (cap 1 MB).

    Its eviction timer never fires during a test: only writes can start an eviction."""
    monkeypatch.setattr(eviction, "CHECK_EVERY", 3600.0)
    assert fake_registry.url
    clock = FakeClock()
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", max_size="1MB"), clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")


def evictor(mirror: Mirror) -> Evictor:
    """The mirror's own evictor, whose loop runs in the background."""
    return mirror.app[ADMIN].evictor


def on_disk(mirror: Mirror) -> tuple[int, int]:
    """Bytes in files under content/ and under tmp/ (the temp files of running fetches)."""
    store = mirror.services.blobs.store
    content = sum(f.stat().st_size for sub in store.content_dir.iterdir() for f in sub.iterdir())
    return content, sum(f.stat().st_size for f in store.tmp_dir.iterdir())


def add_image(registry: FakeRegistry, n: int, layers: int = 2) -> Image:
    return registry.add_image(f"library/app{n}", "1", [bytes([n]) * LAYER + bytes([m]) for m in range(layers)])


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
    for n in range(4):  # 4 images × 2 × 100 kB: just under the 1 MB cap
        images[n] = add_image(fake_registry, n)
        await pull(small_mirror, f"library/app{n}", images[n])
        small_mirror.clock.advance(10)
    metrics = small_mirror.services.metrics
    assert metrics.evictions._value.get() == 0
    await pull(small_mirror, "library/app0", images[0])  # app0 is now the most recently used
    small_mirror.clock.advance(10)
    images[4] = add_image(fake_registry, 4)
    await pull(small_mirror, "library/app4", images[4])  # past the cap: app1, the least recently used, goes
    assert small_mirror.services.blobs.metadata.content.size <= CAP
    for n in range(5):
        assert len(cached(small_mirror, images[n])) == 1, f"image {n} was cut in half"
    assert cached(small_mirror, images[1]) == {False}
    for n in (0, 3, 4):
        assert cached(small_mirror, images[n]) == {True}, f"image {n} was evicted before app1"
    assert metrics.evictions._value.get() >= 4  # manifest, config, two layers
    assert metrics.evicted_bytes._value.get() >= 2 * LAYER
    # an evicted image pulls again, from upstream (or from the fleet's bucket, which still has it)
    fake_registry.reset_counts()
    await pull(small_mirror, "library/app1", images[1])
    assert fake_registry.count(method="GET", kind="blob") == after_local_eviction(3, 0)


async def test_pinned_images_are_never_evicted(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    images = {}
    metadata = small_mirror.services.blobs.metadata
    for n in range(6):  # 6 images × 200 kB against a 1 MB cap, the first two pinned as they arrive
        images[n] = add_image(fake_registry, n)
        await pull(small_mirror, f"library/app{n}", images[n])
        small_mirror.clock.advance(10)
        if n == 0:
            await metadata.pins.add("docker.io", "library/app0", "1")
        if n == 1:
            await metadata.pins.add("docker.io", "library/app1", images[1].digest)
    assert small_mirror.services.metrics.evictions._value.get() > 0
    assert cached(small_mirror, images[0]) == {True}
    assert cached(small_mirror, images[1]) == {True}
    assert cached(small_mirror, images[2]) == {False}
    assert cached(small_mirror, images[5]) == {True}


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
    rows = await small_mirror.services.blobs.metadata.content.usage()
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


async def fetch_blob(mirror: Mirror, repo: str, digest: str) -> bytes:
    resp = await mirror.client.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status == 200
    return await resp.read()


async def test_a_fetch_past_the_cap_evicts_before_it_is_stored(small_mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """No timer tick, no sleep: the eviction ran while the fetch wrote, and the blob was
    committed into the room it made."""
    old = [fake_registry.add_blob("library/fill", os.urandom(300_000)) for _ in range(3)]
    for digest in old:
        await fetch_blob(small_mirror, "library/fill", digest)
        await small_mirror.settled()
        small_mirror.clock.advance(10)
    metrics = small_mirror.services.metrics
    assert metrics.evictions._value.get() == 0
    data = os.urandom(300_000)
    new = fake_registry.add_blob("library/fill", data)
    assert await fetch_blob(small_mirror, "library/fill", new) == data
    await small_mirror.settled()
    assert metrics.evictions._value.get() > 0
    store = small_mirror.services.blobs.store
    assert store.size(old[0]) is None, "the least recently used blob stays past the cap"
    assert store.size(new) == len(data)
    assert small_mirror.services.blobs.metadata.content.size <= CAP
    content, tmp = on_disk(small_mirror)
    assert content <= CAP and tmp == 0


async def test_the_data_directory_stays_within_the_cap_plus_running_fetches(
    small_mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    """A burst of concurrent misses that adds up to more than the cap: at every write and every
    new row, files under content/ and tmp/ add up to no more than the cap plus the temp files."""
    pinned = add_image(fake_registry, 0, layers=1)
    await pull(small_mirror, "library/app0", pinned)
    await small_mirror.services.blobs.metadata.pins.add("docker.io", "library/app0", "1")
    old = [fake_registry.add_blob("library/burst", os.urandom(200_000)) for _ in range(4)]
    for digest in old:  # with the pinned image: about 900 kB cached
        await fetch_blob(small_mirror, "library/burst", digest)
        await small_mirror.settled()
        small_mirror.clock.advance(10)
    bodies = {fake_registry.add_blob("library/burst", body): body for body in (os.urandom(60_000) for _ in range(8))}

    ev = evictor(small_mirror)
    inflight = small_mirror.services.blobs.inflight
    samples: list[tuple[int, int]] = []
    all_writing = asyncio.Event()

    def sampled(hook):  # type: ignore[no-untyped-def]
        def run() -> None:
            samples.append(on_disk(small_mirror))
            if len(inflight.temp_files()) == len(bodies):
                all_writing.set()
            hook()
        return run

    ev.written, ev.stored = sampled(ev.written), sampled(ev.stored)  # type: ignore[method-assign]
    fake_registry.stall = asyncio.Event()  # every fetch writes its first chunk, then waits
    fake_registry.chunk_size = 16 * 1024
    fake_registry.chunk_delay = 0.001  # a slow stream on purpose: a write, and a sample, per chunk
    pulls = [asyncio.ensure_future(fetch_blob(small_mirror, "library/burst", d)) for d in bodies]
    await all_writing.wait()
    fake_registry.stall.set()
    assert await asyncio.gather(*pulls) == list(bodies.values())
    await small_mirror.settled()

    assert len(samples) >= 8 * 4  # a sample per written chunk at least
    over = [(content, tmp) for content, tmp in samples if content + tmp > CAP + tmp]
    assert not over, f"{len(over)} of {len(samples)} samples over the cap plus the running fetches: {over[:3]}"
    assert max(tmp for _content, tmp in samples) >= 8 * 16 * 1024  # all eight were writing at once
    assert small_mirror.services.metrics.evicted_bytes._value.get() >= 2 * 200_000
    assert cached(small_mirror, pinned) == {True}
    store = small_mirror.services.blobs.store
    assert store.size(old[0]) is None and store.size(old[1]) is None
    assert all(store.size(d) == len(body) for d, body in bodies.items())
    content, tmp = on_disk(small_mirror)
    assert content <= CAP and tmp == 0


async def test_a_burst_of_wakes_runs_one_eviction_and_leaves_one_pending(
    small_mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    """While one eviction runs, many writes past the cap ask for more: one more runs after it.
    Clients get their whole blobs meanwhile; only the commits wait for the room."""
    # 960 kB stored: within the cap, but not with the room running fetches may take (10% of it)
    old = [fake_registry.add_blob("library/fill", os.urandom(320_000)) for _ in range(3)]
    for digest in old:
        await fetch_blob(small_mirror, "library/fill", digest)
        await small_mirror.settled()
        small_mirror.clock.advance(10)
    ev = evictor(small_mirror)
    async with ev.room():  # no eviction left running from before
        pass
    evict = ev.evict
    runs = 0
    asks = 0
    gate = asyncio.Event()

    async def gated(force: bool = False) -> tuple[int, int]:
        nonlocal runs
        runs += 1
        await gate.wait()
        return await evict(force)

    def counted() -> None:
        nonlocal asks
        asks += ev.used() > CAP
        written()

    written = ev.written
    ev.evict, ev.written = gated, counted  # type: ignore[method-assign]
    bodies = {fake_registry.add_blob("library/fill", body): body for body in (os.urandom(100_000) for _ in range(6))}
    fake_registry.chunk_size = 16 * 1024
    fake_registry.chunk_delay = 0.001  # a batch per chunk: many writes past the cap
    got = await asyncio.gather(*(fetch_blob(small_mirror, "library/fill", d) for d in bodies))
    assert got == list(bodies.values())
    assert asks >= 12 and runs == 1  # one eviction started, held at the gate; the rest wait as one
    assert set(small_mirror.services.blobs.inflight.temp_files()) != set()  # commits wait for room
    gate.set()
    async with ev.room():
        pass
    assert 2 <= runs <= 1 + len(bodies)  # the pending one, then at most one per commit making its room
    await small_mirror.settled()
    store = small_mirror.services.blobs.store
    assert all(store.size(d) == len(body) for d, body in bodies.items())
    assert small_mirror.services.blobs.metadata.content.size <= CAP


async def test_with_all_else_pinned_writes_past_the_cap_do_not_plan_a_pass_each(
    small_mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    """A pass that finds nothing more to remove leaves writes room past the cap before they ask
    again; a new row still asks at once, and an unpinned blob past the cap does not stay."""
    metadata = small_mirror.services.blobs.metadata
    # over 900 kB, all pinned: within the cap, but not with the room running fetches may take
    images = [add_image(fake_registry, n, layers=2 if n < 4 else 1) for n in range(5)]
    for n, image in enumerate(images):
        await pull(small_mirror, f"library/app{n}", image)
        await metadata.pins.add("docker.io", f"library/app{n}", "1")
    ev = evictor(small_mirror)
    evict, written = ev.evict, ev.written
    runs = past = 0

    async def counted_evict(force: bool = False) -> tuple[int, int]:
        nonlocal runs
        runs += 1
        return await evict(force)

    def counted_written() -> None:
        nonlocal past
        past += ev.used() > CAP
        written()

    ev.evict, ev.written = counted_evict, counted_written  # type: ignore[method-assign]
    fake_registry.chunk_size = 16 * 1024
    fake_registry.chunk_delay = 0.001  # a slow stream on purpose: a batch per chunk, many writes past the cap
    data = os.urandom(600_000)
    digest = fake_registry.add_blob("library/app0", data)
    assert await fetch_blob(small_mirror, "library/app0", digest) == data
    await small_mirror.settled()
    async with ev.room():
        pass
    assert past >= 10 and runs <= past // 3, (past, runs)  # a few passes (crossing, commit, new row), not one per batch
    assert all(cached(small_mirror, image) == {True} for image in images)
    assert small_mirror.services.blobs.store.size(digest) is None
    assert metadata.content.size <= CAP


def test_a_plan_reads_each_manifest_once(tmp_path: Path) -> None:
    """Manifests never change: the next plan takes what they reference from the last one."""
    store = FileStore(tmp_path)
    store.prepare()
    layers = ["sha256:" + f"{n:064x}" for n in range(2)]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": layers[0], "size": 1},
                       "layers": [{"digest": layers[1], "size": 1}]}).encode()
    manifest = digest_of(body)
    store.put(manifest, body)
    rows = [(manifest, len(body), "manifest", 2.0), (layers[0], 1, "blob", 1.0), (layers[1], 1, "blob", 1.0)]
    first = plan_images(rows, store)

    class Unreadable(FileStore):
        def read(self, digest: str) -> bytes | None:
            raise AssertionError(f"{digest} read again")

    second = plan_images(rows, Unreadable(tmp_path), first.children)
    assert [u.closure for u in second] == [u.closure for u in first] == [{manifest, *layers}]
