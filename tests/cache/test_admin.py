"""CacheAdmin against a mirror in front of the fake registry: stats, pins, purges and gc.

Content gets into the cache the way clients put it there (pulls through the mirror);
CacheAdmin is then called directly, as the admin API and the command line call it.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from mirror.cache.admin import AdminError, CacheAdmin
from mirror.cache.eviction import Evictor
from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry, Image, Manifest, digest_of
from tests.proxy.test_manifests import ACCEPT

CAP = 50_000_000


@pytest.fixture
def admin(mirror: Mirror) -> CacheAdmin:
    """A CacheAdmin on the mirror's store and database, wired as the app wires its own."""
    services = mirror.services
    blobs = services.blobs
    evictor = Evictor(blobs.store, blobs.metadata, services.metrics, lambda: CAP, services.manifests.forget,
                      blobs.inflight.bytes_in_flight)
    return CacheAdmin(blobs.store, blobs.metadata, services.router, evictor, lambda: CAP, mirror.clock,
                      blobs.inflight.temp_files, shared=blobs.shared)


def local(result: dict[str, object]) -> dict[str, object]:
    """What an operation did on the mirror's own disk: without what it did on a fleet's bucket
    (MIRROR_TEST_STORAGE=s3), which tests/cache/test_bucket_eviction.py covers."""
    return {k: v for k, v in result.items() if k not in ("removed_from_bucket", "aborted_uploads")}


def parts(image: Image) -> list[str]:
    """Every digest of an image: its manifest, config and layers."""
    return [image.digest, image.config_digest, *image.layer_digests]


async def pull(mirror: Mirror, repo: str, ref: str, images: list[Image]) -> None:
    """Pull `repo:ref` through the mirror as a client does: the manifest (an index's children too)
    and every blob, then wait until all of it is stored."""
    resp = await mirror.client.get(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    for image in images:
        if image.digest != resp.headers["Docker-Content-Digest"]:
            assert (await mirror.client.get(f"/v2/{repo}/manifests/{image.digest}", headers=ACCEPT)).status == 200
        for digest in (image.config_digest, *image.layer_digests):
            resp = await mirror.client.get(f"/v2/{repo}/blobs/{digest}")
            assert resp.status == 200
            await resp.read()
    await mirror.settled()
    await mirror.services.blobs.metadata.flush()


async def purge_all(mirror: Mirror, admin: CacheAdmin) -> dict[str, object]:
    """Purge everything unused since now, a second after the last pull (`--older-than 0s`)."""
    mirror.clock.advance(1)
    return await admin.purge(older_than=0)


def cached(mirror: Mirror, digests: list[str]) -> list[bool]:
    store = mirror.services.blobs.store
    return [store.size(d) is not None for d in digests]


async def image_in(mirror: Mirror, fake: FakeRegistry, repo: str, tag: str = "1", layers: list[bytes] | None = None,
                   ) -> Image:
    image = fake.add_image(repo, tag, layers if layers is not None else [os.urandom(10_000), os.urandom(20_000)])
    await pull(mirror, repo, tag, [image])
    return image


async def index_in(mirror: Mirror, fake: FakeRegistry, repo: str = "library/multi") -> tuple[Manifest, list[Image]]:
    """A two-platform index tagged 1, pulled whole."""
    images = [fake.add_image(repo, None, 2, platform=p) for p in ("linux/amd64", "linux/arm64")]
    index = fake.add_index(repo, "1", images)
    await pull(mirror, repo, "1", images)
    return index, images


# -- stats ---------------------------------------------------------------------------------------

async def test_stats_count_what_is_cached_by_kind_and_repository(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    empty = await admin.stats()
    assert (empty["size_bytes"], empty["objects"], empty["pins"], empty["top_by_size"]) == (0, {}, [], [])
    assert empty["max_bytes"] == CAP and empty["oldest_access"] is None and empty["hit_ratio"] is None
    small = await image_in(mirror, fake_registry, "library/small", layers=[b"s" * 1000])
    big = await image_in(mirror, fake_registry, "library/big", layers=[os.urandom(100_000), os.urandom(50_000)])
    resp = await mirror.client.get(f"/v2/library/small/blobs/{small.layer_digests[0]}")  # a hit
    await resp.read()
    stats = await admin.stats()
    blobs = [small.config, *small.layers, big.config, *big.layers]
    assert stats["objects"] == {"manifest": 2, "blob": len(blobs)}
    assert stats["bytes_by_kind"] == {"manifest": len(small.body) + len(big.body), "blob": sum(map(len, blobs))}
    assert stats["size_bytes"] == len(small.body) + len(big.body) + sum(map(len, blobs))
    assert stats["oldest_access"] == mirror.clock.now
    assert [r["repository"] for r in stats["top_by_size"]] == ["docker.io/library/big", "docker.io/library/small"]
    assert stats["top_by_size"][0]["bytes"] == len(big.body) + len(big.config) + sum(map(len, big.layers))
    hits = {r["repository"]: r["hits"] for r in stats["top_by_hits"]}
    assert hits["docker.io/library/small"] > hits.get("docker.io/library/big", 0)
    assert (await admin.stats(top=1))["top_by_size"] == stats["top_by_size"][:1]


# -- pins ----------------------------------------------------------------------------------------

async def test_a_pinned_tag_keeps_its_image_through_a_purge_of_everything(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    kept = await image_in(mirror, fake_registry, "library/kept")
    gone = await image_in(mirror, fake_registry, "library/gone")
    assert await admin.pin("library/kept:1") == {"pinned": "docker.io/library/kept:1"}
    assert (await admin.stats())["pins"] == ["docker.io/library/kept:1"]
    result = await purge_all(mirror, admin)
    size = len(gone.body) + len(gone.config) + sum(map(len, gone.layers))
    assert local(result) == {"removed": 4, "bytes": size, "kept_pinned": 4}
    assert cached(mirror, parts(kept)) == [True] * 4
    assert cached(mirror, parts(gone)) == [False] * 4
    assert await admin.unpin("library/kept:1") == {"unpinned": "docker.io/library/kept:1"}
    assert (await admin.stats())["pins"] == []
    assert (await purge_all(mirror, admin))["removed"] == 4
    assert cached(mirror, parts(kept)) == [False] * 4


async def test_a_pinned_digest_keeps_its_image(mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    image = await image_in(mirror, fake_registry, "library/app")
    ref = f"library/app@{image.digest}"
    assert await admin.pin(ref) == {"pinned": f"docker.io/{ref}"}
    assert (await admin.stats())["pins"] == [f"docker.io/{ref}"]
    assert local(await purge_all(mirror, admin)) == {"removed": 0, "bytes": 0, "kept_pinned": 4}
    assert cached(mirror, parts(image)) == [True] * 4
    await admin.unpin(ref)
    assert (await purge_all(mirror, admin))["removed"] == 4


async def test_a_pinned_index_keeps_every_platform(mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    index, images = await index_in(mirror, fake_registry)
    other = await image_in(mirror, fake_registry, "library/other")
    await admin.pin("library/multi:1")
    result = await purge_all(mirror, admin)
    assert result["removed"] == 4 and result["kept_pinned"] == 1 + 2 * 4
    assert cached(mirror, [index.digest, *parts(images[0]), *parts(images[1])]) == [True] * 9
    assert cached(mirror, parts(other)) == [False] * 4
    await admin.unpin("library/multi:1")
    await admin.pin(f"library/multi@{index.digest}")  # by digest, the same
    assert (await purge_all(mirror, admin))["removed"] == 0
    await admin.unpin(f"library/multi@{index.digest}")
    assert (await purge_all(mirror, admin))["removed"] == 9


@pytest.mark.parametrize("ref, message", [
    ("library/never:1", "not cached"),
    (f"library/never@sha256:{'0' * 64}", "not cached"),
    ("Not/Valid:1", "invalid"),
    ("library/app:bad tag", "invalid tag"),
    ("library/app@sha256:short", "invalid"),
    ("no.such.registry/app:1", "not mirrored"),
])
async def test_pinning_what_is_not_cached_or_not_a_reference_is_refused(
        mirror: Mirror, admin: CacheAdmin, ref: str, message: str) -> None:
    with pytest.raises(AdminError, match=message):
        await admin.pin(ref)
    assert (await admin.stats())["pins"] == []


async def test_unpinning_what_is_not_pinned_is_refused(mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    await image_in(mirror, fake_registry, "library/app")
    with pytest.raises(AdminError, match="not pinned"):
        await admin.unpin("library/app:1")
    await admin.pin("library/app:1")
    await admin.unpin("library/app:1")
    with pytest.raises(AdminError, match="not pinned"):
        await admin.unpin("library/app:1")


# -- purge ---------------------------------------------------------------------------------------

async def test_purge_of_an_image_keeps_the_layers_another_image_shares(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    base, own = os.urandom(30_000), os.urandom(5_000)
    doomed = await image_in(mirror, fake_registry, "library/app", "1", [base, own])
    kept = await image_in(mirror, fake_registry, "library/app", "2", [base, os.urandom(6_000)])
    result = await admin.purge(image="library/app:1")
    assert local(result) == {"removed": 3, "bytes": len(doomed.body) + len(doomed.config) + len(own), "kept_pinned": 0}
    assert cached(mirror, parts(doomed)) == [False, False, True, False]  # the shared base layer stays
    assert cached(mirror, parts(kept)) == [True] * 4
    fake_registry.reset_counts()  # the tag went with it: the next pull asks upstream again
    await pull(mirror, "library/app", "1", [doomed])
    assert fake_registry.count("GET", "manifest") == 1 and fake_registry.count("GET", "blob") == 2
    assert cached(mirror, parts(doomed)) == [True] * 4


async def test_purge_of_an_index_by_digest_takes_every_platform(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    index, images = await index_in(mirror, fake_registry)
    result = await admin.purge(image=f"library/multi@{index.digest}")
    assert result["removed"] == 9
    assert cached(mirror, [index.digest, *parts(images[0]), *parts(images[1])]) == [False] * 9
    assert (await admin.stats())["size_bytes"] == 0


async def test_purge_of_a_repository_keeps_content_linked_elsewhere(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    shared = os.urandom(20_000)
    one = await image_in(mirror, fake_registry, "library/app", "1", [shared])
    two = await image_in(mirror, fake_registry, "library/app", "2", [os.urandom(7_000)])
    other = await image_in(mirror, fake_registry, "library/other", "1", [shared, os.urandom(3_000)])
    result = await admin.purge(repo="library/app")
    assert result["removed"] == 5 and result["kept_pinned"] == 0
    assert cached(mirror, [*parts(one), *parts(two)]) == [False, False, True, False, False, False]
    assert cached(mirror, parts(other)) == [True] * 4
    assert [r["repository"] for r in (await admin.stats())["top_by_size"]] == ["docker.io/library/other"]
    fake_registry.reset_counts()  # its tags and links are gone too: the shared layer is confirmed upstream again
    await pull(mirror, "library/app", "1", [one])
    assert fake_registry.count("GET", "manifest") == 1


async def test_purge_older_than_takes_only_images_unused_since(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    old = await image_in(mirror, fake_registry, "library/old")
    mirror.clock.advance(3600)
    recent = await image_in(mirror, fake_registry, "library/recent")
    mirror.clock.advance(60)
    assert (await admin.purge(older_than=7200))["removed"] == 0
    assert (await admin.purge(older_than=600))["removed"] == 4
    assert cached(mirror, parts(old)) == [False] * 4
    assert cached(mirror, parts(recent)) == [True] * 4


@pytest.mark.parametrize("args", [{}, {"image": "library/app:1", "repo": "library/app"},
                                  {"repo": "library/app", "older_than": 60.0}])
async def test_purge_takes_exactly_one_selector(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin, args: dict[str, object]) -> None:
    image = await image_in(mirror, fake_registry, "library/app")
    with pytest.raises(AdminError, match="exactly one"):
        await admin.purge(**args)  # type: ignore[arg-type]
    assert cached(mirror, parts(image)) == [True] * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"image": "library/never:1"}, "not cached"),
    ({"image": "Not/Valid"}, "invalid"),
    ({"repo": "no.such.registry/app"}, "not mirrored"),
])
async def test_purge_of_what_cannot_be_named_is_refused(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin, kwargs: dict[str, str], message: str) -> None:
    image = await image_in(mirror, fake_registry, "library/app")
    with pytest.raises(AdminError, match=message):
        await admin.purge(**kwargs)  # type: ignore[arg-type]
    assert cached(mirror, parts(image)) == [True] * 4


# -- gc ------------------------------------------------------------------------------------------

async def test_gc_drops_rows_without_files_and_adopts_or_removes_files_without_rows(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    image = await image_in(mirror, fake_registry, "library/app")
    store = mirror.services.blobs.store
    store.remove(image.layer_digests[0])  # a row whose file is gone
    stray = b"a verified file nobody wrote a row for"
    store.put(digest_of(stray), stray)
    liar = store.path("sha256:" + "1" * 64)  # a file that does not hash to its name
    liar.parent.mkdir(parents=True, exist_ok=True)
    liar.write_bytes(b"not what the name says")
    assert local(await admin.gc()) == {"dropped_rows": 1, "adopted_files": 1, "removed_temp_files": 0}
    assert not liar.exists()
    stats = await admin.stats()
    assert stats["objects"] == {"manifest": 1, "blob": 3}  # config, one layer and the adopted file
    assert local(await admin.gc()) == {"dropped_rows": 0, "adopted_files": 0, "removed_temp_files": 0}


async def test_gc_removes_stale_temp_files_and_keeps_those_of_running_fetches(
        mirror: Mirror, fake_registry: FakeRegistry, admin: CacheAdmin) -> None:
    data = os.urandom(300_000)
    digest = fake_registry.add_blob("library/app", data)
    store = mirror.services.blobs.store
    for name in ("left-by-a-crash", "another"):
        (store.tmp_dir / name).write_bytes(b"partial")
    hold = fake_registry.hold(digest, after=64 * 1024)
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")  # a fetch in flight, writing a temp file
    await asyncio.wait_for(hold.reached(), 10)
    running = mirror.services.blobs.inflight.temp_files()
    assert len(running) == 1
    assert local(await admin.gc()) == {"dropped_rows": 0, "adopted_files": 0, "removed_temp_files": 2}
    assert {p.name for p in store.tmp_dir.iterdir()} == running
    hold.release()
    assert await resp.read() == data
    await mirror.settled()
    assert store.size(digest) == len(data)
