"""Replicas sharing one bucket (storage.backend "s3") in front of the fake upstream: what one fetched
the others serve without fetching it again, after the same checks as a hit, verified, and a bucket
that fails is a clear 503, never the local disk silently standing in."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mirror
from tests.fleet import Replica, replica, settled  # noqa: F401  (a fixture)
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.registry import FakeRegistry, digest_of
from tests.integration.s3 import S3Gateway

REPO = "library/app"


async def get(m: Mirror, path: str, **kwargs: Any) -> tuple[int, bytes]:
    resp = await m.client.get(path, **kwargs)
    return resp.status, await resp.read()


async def test_a_blob_one_replica_fetched_reaches_another_without_an_upstream_get(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(3 << 20)
    digest = fake_registry.add_blob(REPO, data)
    a, b = await replica(), await replica()
    assert await get(a, f"/v2/{REPO}/blobs/{digest}") == (200, data)
    await settled(a)
    assert await b.services.blobs.shared.size(digest) == len(data)  # type: ignore[union-attr]
    fake_registry.reset_counts()
    resp = await b.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert (resp.status, await resp.read()) == (200, data)
    assert fake_registry.count(method="GET") == 0
    # B has no row for it: upstream's link is checked (a HEAD, which Docker Hub does not count)
    assert fake_registry.count(method="HEAD", kind="blob") == 1
    await settled(b)
    assert b.services.blobs.store.size(digest) == len(data)  # now B's own copy: the next is a local hit
    fake_registry.reset_counts()
    assert await get(b, f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=10-19"}) == (206, data[10:20])
    assert fake_registry.count() == 0


async def test_a_blob_in_the_bucket_is_not_served_through_a_repository_upstream_does_not_hold_it_in(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(100_000)
    digest = fake_registry.add_blob(REPO, data)
    fake_registry.add_blob("library/other", b"something else")
    a, b = await replica(), await replica()
    assert await get(a, f"/v2/{REPO}/blobs/{digest}") == (200, data)
    await settled(a)
    resp = await b.client.get(f"/v2/library/other/blobs/{digest}")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    resp = await b.client.head(f"/v2/library/other/blobs/{digest}")
    assert resp.status == 404
    assert b.services.blobs.store.size(digest) is None


async def test_a_head_of_what_the_bucket_holds_costs_no_upstream_get(replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(50_000)
    digest = fake_registry.add_blob(REPO, data)
    a, b = await replica(), await replica()
    await get(a, f"/v2/{REPO}/blobs/{digest}")
    await settled(a)
    fake_registry.reset_counts()
    resp = await b.client.head(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == len(data)
    assert fake_registry.count(method="GET") == 0


async def test_an_image_pulled_through_one_replica_costs_another_no_upstream_get(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image(REPO, "v1", 2)
    a, b = await replica(), await replica()
    for m in (a, b):
        resp = await m.client.get(f"/v2/{REPO}/manifests/{image.digest}",
                                  headers={"Accept": image.media_type})
        assert resp.status == 200
        assert await resp.read() == image.body
        for layer_digest, layer in zip(image.layer_digests, image.layers):
            assert await get(m, f"/v2/{REPO}/blobs/{layer_digest}") == (200, layer)
        await settled(m)
        if m is a:
            fake_registry.reset_counts()
    assert fake_registry.count(method="GET") == 0
    assert fake_registry.count(method="HEAD") >= 1  # the links B had no row for


async def test_an_object_whose_bytes_do_not_match_its_digest_is_never_served_whole_and_is_deleted(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway) -> None:
    data = os.urandom(200_000)
    digest = fake_registry.add_blob(REPO, data)
    b = await replica()
    shared = b.services.blobs.shared
    assert shared is not None
    tampered = bytearray(data)
    tampered[-1] ^= 1
    async with s3.client() as client:
        await client.put_object(Bucket=s3.bucket, Key=shared.bucket.key(digest), Body=bytes(tampered))
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(b, f"/v2/{REPO}/blobs/{digest}")  # cut short: the last byte waits for the digest check
    await settled(b)
    assert b.services.blobs.store.size(digest) is None
    assert await shared.size(digest) is None  # deleted from the bucket
    assert b.services.metrics.bucket_discarded._value.get() == 1
    assert await get(b, f"/v2/{REPO}/blobs/{digest}") == (200, data)  # the retry fetches it from upstream
    await settled(b)
    assert await shared.size(digest) == len(data)  # and shares the right bytes


async def test_a_manifest_in_the_bucket_that_is_not_its_digest_is_deleted_and_fetched_upstream(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway) -> None:
    image = fake_registry.add_image(REPO, "v1", 1)
    b = await replica()
    shared = b.services.blobs.shared
    assert shared is not None
    async with s3.client() as client:
        await client.put_object(Bucket=s3.bucket, Key=shared.bucket.key(image.digest), Body=image.body + b" ")
    resp = await b.client.get(f"/v2/{REPO}/manifests/{image.digest}", headers={"Accept": image.media_type})
    assert (resp.status, await resp.read()) == (200, image.body)
    assert fake_registry.count(method="GET", kind="manifest") == 1
    await settled(b)
    assert await shared.manifest(image.digest) == image.body


async def test_a_layer_asked_for_as_a_manifest_is_not_read_from_the_bucket_into_memory(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(5 << 20)
    digest = fake_registry.add_blob(REPO, data)
    a, b = await replica(), await replica()
    await get(a, f"/v2/{REPO}/blobs/{digest}")
    await settled(a)
    resp = await b.client.get(f"/v2/{REPO}/manifests/{digest}")
    assert resp.status == 404  # upstream's answer: it is no manifest
    assert await b.services.blobs.shared.size(digest) == len(data)  # type: ignore[union-attr]


async def test_redirect_sends_a_presigned_url_of_what_the_bucket_holds(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(300_000)
    digest = fake_registry.add_blob(REPO, data)
    a = await replica()
    await get(a, f"/v2/{REPO}/blobs/{digest}")
    await settled(a)
    b = await replica(redirect=True)
    fake_registry.reset_counts()
    resp = await b.client.get(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert resp.status == 307
    assert resp.headers["Docker-Content-Digest"] == digest
    location = resp.headers["Location"]
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=1200" in location
    async with aiohttp.ClientSession() as http:
        async with http.get(location) as got:
            assert (got.status, await got.read()) == (200, data)
        async with http.get(location, headers={"Range": "bytes=5-9"}) as got:
            assert (got.status, await got.read()) == (206, data[5:10])
    assert fake_registry.count(method="GET") == 0
    # a HEAD is answered here; several ranges are not redirected (S3 would send the whole object)
    resp = await b.client.head(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert (resp.status, int(resp.headers["Content-Length"])) == (200, len(data))
    resp = await b.client.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=0-0,5-6"}, allow_redirects=False)
    assert resp.status == 206
    resp = await a.client.get(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert resp.status == 200  # a replica without redirect sends the bytes


async def test_a_miss_in_redirect_mode_streams_from_upstream_and_then_redirects(
        replica: Replica, fake_registry: FakeRegistry) -> None:
    data = os.urandom(100_000)
    digest = fake_registry.add_blob(REPO, data)
    a = await replica(redirect=True)
    assert await get(a, f"/v2/{REPO}/blobs/{digest}", allow_redirects=False) == (200, data)
    await settled(a)
    resp = await a.client.get(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert resp.status == 307


@pytest.fixture
async def failing_bucket(s3: S3Gateway) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(s3.endpoint_url)
    proxy.keep_host = True
    proxy.start()
    yield proxy
    proxy.stop()


async def test_a_failing_bucket_is_a_503_naming_it_never_the_local_disk_alone(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway, failing_bucket: FaultProxy) -> None:
    data = os.urandom(100_000)
    digest = fake_registry.add_blob(REPO, data)
    local = os.urandom(1000)
    cached = fake_registry.add_blob(REPO, local)
    m = await replica(s3.config(endpoint_url=failing_bucket.url, read_timeout=1.0))
    assert await get(m, f"/v2/{REPO}/blobs/{cached}") == (200, local)
    await settled(m)
    failing_bucket.status = 500
    fake_registry.reset_counts()
    resp = await m.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 503
    error = (await resp.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "shared content store" in error["message"] and s3.bucket in error["message"]
    assert fake_registry.count(method="GET") == 0
    failures = sum(m.services.metrics.bucket_requests.labels("head_object", outcome)._value.get()
                   for outcome in ("error", "timeout"))
    assert failures >= 1
    # what this replica holds itself is still served
    assert await get(m, f"/v2/{REPO}/blobs/{cached}") == (200, local)
    failing_bucket.status = None
    assert await get(m, f"/v2/{REPO}/blobs/{digest}") == (200, data)


async def test_redirect_mode_sends_its_own_copy_when_the_bucket_fails(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway, failing_bucket: FaultProxy) -> None:
    data = os.urandom(10_000)
    digest = fake_registry.add_blob(REPO, data)
    m = await replica(s3.config(endpoint_url=failing_bucket.url, read_timeout=1.0), redirect=True)
    assert await get(m, f"/v2/{REPO}/blobs/{digest}", allow_redirects=False) == (200, data)
    await settled(m)
    assert (await m.client.get(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)).status == 307
    failing_bucket.status = 500
    assert await get(m, f"/v2/{REPO}/blobs/{digest}", allow_redirects=False) == (200, data)


async def test_a_bucket_that_hangs_is_a_503_within_one_request_s_timeouts(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway, failing_bucket: FaultProxy) -> None:
    digest = fake_registry.add_blob(REPO, os.urandom(1000))
    m = await replica(s3.config(endpoint_url=failing_bucket.url, connect_timeout=0.5, read_timeout=0.5))
    failing_bucket.hang = True
    began = time.monotonic()
    resp = await m.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 503
    assert "did not answer within 1s" in (await resp.json())["errors"][0]["message"]
    assert time.monotonic() - began < 5
    failing_bucket.hang = False


async def test_an_upload_that_fails_midway_publishes_nothing_and_the_blob_stays_cached_here(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway, failing_bucket: FaultProxy) -> None:
    data = os.urandom(20 << 20)  # a multipart upload
    digest = fake_registry.add_blob(REPO, data)
    m = await replica(s3.config(endpoint_url=failing_bucket.url, read_timeout=1.0))
    failing_bucket.status, failing_bucket.status_methods = 500, {"PUT"}  # the parts fail
    assert await get(m, f"/v2/{REPO}/blobs/{digest}") == (200, data)
    await settled(m)
    assert m.services.blobs.store.size(digest) == len(data)
    assert m.services.metrics.bucket_requests.labels("upload_part", "error")._value.get() >= 1
    failing_bucket.reset()
    shared = m.services.blobs.shared
    assert shared is not None
    assert await shared.size(digest) is None  # nothing published
    async with s3.client() as client:
        uploads = await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=shared.bucket.config.prefix)
    assert not uploads.get("Uploads")  # aborted, not left behind


async def test_a_blob_is_uploaded_only_once_verified_and_stored(
        replica: Replica, fake_registry: FakeRegistry, s3: S3Gateway) -> None:
    data = os.urandom(20 << 20)
    digest = fake_registry.add_blob(REPO, data)
    m = await replica(upstream={"read_timeout": 30.0})
    shared = m.services.blobs.shared
    assert shared is not None
    hold = fake_registry.hold(digest, after=len(data) - 1)  # all but the last byte
    resp = await m.client.get(f"/v2/{REPO}/blobs/{digest}")
    await hold.reached(1)
    await asyncio.sleep(0.2)  # time an eager upload would have taken to begin
    requests = m.services.metrics.bucket_requests
    assert requests.labels("create_multipart_upload", "ok")._value.get() == 0
    assert await shared.size(digest) is None
    hold.release()
    assert (resp.status, await resp.read()) == (200, data)
    await settled(m)
    assert await shared.size(digest) == len(data)
    assert m.services.metrics.bucket_bytes.labels("up")._value.get() == len(data)


async def test_a_blob_that_fails_its_digest_check_is_never_published(
        replica: Replica, fake_registry: FakeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    data = os.urandom(20 << 20)
    digest = fake_registry.add_blob(REPO, data)
    m = await replica()
    fake_registry.corrupt_blobs = True
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(m, f"/v2/{REPO}/blobs/{digest}")
    await settled(m)
    shared = m.services.blobs.shared
    assert shared is not None
    assert await shared.size(digest) is None
    assert "not shared" not in caplog.text
    assert m.services.metrics.bucket_requests.labels("create_multipart_upload", "ok")._value.get() == 0
