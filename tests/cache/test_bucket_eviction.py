"""Eviction and maintenance on a fleet's bucket, against the real S3 gateway: least recently used
(by any replica) goes first, nothing used within the grace period or pinned goes at all, and
`mirror cache` purges and gc reach the bucket."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from mirror.adminapi import ADMIN
from mirror.cache import bucketeviction
from mirror.cache.admin import perform
from mirror.cache.bucketeviction import GRACE, BucketEvictor
from mirror.metrics import Metrics
from mirror.proxy.shared import SharedContent
from mirror.storage.bucket import Bucket
from mirror.storage.filestore import FileStore
from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry, digest_of
from tests.fleet import Replica, replica, settled  # noqa: F401  (a fixture)
from tests.integration.s3 import S3Gateway


@pytest.fixture
async def shared(s3: S3Gateway, tmp_path) -> AsyncIterator[SharedContent]:  # type: ignore[no-untyped-def]
    bucket = Bucket(s3.config(), Metrics())
    await bucket.open()
    yield SharedContent(bucket, FileStore(tmp_path), Metrics())
    await bucket.close()


async def _put(shared: SharedContent, size: int) -> str:
    data = os.urandom(size)
    await shared.bucket.upload_bytes(digest_of(data), data)
    return digest_of(data)


def _later() -> float:
    return time.time() + GRACE + 60  # everything stored so far is past the grace period then


async def _pins(*digests: str) -> set[str]:
    return set(digests)


async def test_the_least_recently_used_by_any_replica_goes_first_down_to_the_low_mark(shared: SharedContent) -> None:
    old, used_again = await _put(shared, 1000), await _put(shared, 1000)
    await asyncio.sleep(1.1)  # LastModified has whole seconds
    await shared.bucket.mark_used(used_again)  # as another replica would
    new = await _put(shared, 1000)
    metrics = Metrics()
    evictor = BucketEvictor(shared, 2500, _pins, metrics, _later)
    assert await evictor.evict() == (1, 1000)
    assert {o.digest for o in await shared.bucket.objects()} == {used_again, new}
    assert metrics.bucket_evictions._value.get() == 1 and metrics.bucket_evicted_bytes._value.get() == 1000
    assert await evictor.evict() == (0, 0)  # under the cap now


async def test_nothing_used_within_the_grace_period_or_pinned_is_evicted(shared: SharedContent,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    digests = [await _put(shared, 1000) for _ in range(3)]
    evictor = BucketEvictor(shared, 1000, _pins, Metrics(), time.time)
    assert await evictor.evict() == (0, 0)
    assert "stays over its cap" in caplog.text
    pinned = BucketEvictor(shared, 1000, lambda: _pins(digests[0], digests[1]), Metrics(), _later)
    assert await pinned.evict() == (1, 1000)
    assert {o.digest for o in await shared.bucket.objects()} == set(digests[:2])


async def test_a_candidate_used_after_the_listing_is_spared(shared: SharedContent, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = await _put(shared, 1000)
    evictor = BucketEvictor(shared, 10, _pins, Metrics(), lambda: time.time() + 30)
    monkeypatch.setattr(bucketeviction, "GRACE", 20)  # listed as unused for 30 s by this clock...
    listed = shared.bucket.objects

    async def objects():  # type: ignore[no-untyped-def]
        found = await listed()
        await asyncio.sleep(3.1)  # HEAD gives LastModified in whole seconds
        await shared.bucket.mark_used(digest)  # ...and another replica begins to use it meanwhile
        return found
    monkeypatch.setattr(shared.bucket, "objects", objects)
    evictor.clock = lambda: time.time() + 18.5  # past the listed use, not past the fresh marker
    assert await evictor.evict() == (0, 0)
    assert await shared.bucket.size(digest) == 1000


async def test_purge_and_gc_reach_the_bucket(replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway) -> None:
    image = fake_registry.add_image("library/app", "v1", 2)
    m: Mirror = await replica()
    resp = await m.client.get(f"/v2/library/app/manifests/v1", headers={"Accept": image.media_type})
    assert resp.status == 200
    for layer in image.layer_digests:
        await (await m.client.get(f"/v2/library/app/blobs/{layer}")).read()
    await settled(m)
    bucket = m.services.blobs.shared.bucket  # type: ignore[union-attr]
    assert {image.digest, *image.layer_digests} <= {o.digest for o in await bucket.objects()}
    parts_admin = m.app[ADMIN]
    stats = await perform(parts_admin, "stats", {})
    assert stats["bucket"]["objects"] >= 3 and stats["bucket"]["location"] == bucket.location  # type: ignore[index]
    async with s3.client() as client:
        await client.create_multipart_upload(Bucket=s3.bucket, Key=bucket.key(digest_of(b"crashed")))
    m.clock.now = time.time() + 2 * 86400  # the mirror's clock: the upload above is now from long ago
    gc = await perform(parts_admin, "gc", {})
    assert gc["aborted_uploads"] == 1
    purged = await perform(parts_admin, "purge", {"ref": "library/app:v1"})
    assert purged["removed_from_bucket"] == 3
    assert not {image.digest, *image.layer_digests} & {o.digest for o in await bucket.objects()}
