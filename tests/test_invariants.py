"""One test per invariant of the design, named for it, through the mirror's HTTP API."""
from __future__ import annotations

import asyncio
import os
import tracemalloc

import aiohttp
import pytest

from tests.conftest import TAG_TTL, Mirror
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT


async def _read_or_none(resp: aiohttp.ClientResponse) -> bytes | None:
    try:
        return await resp.read()
    except aiohttp.ClientPayloadError:
        return None


async def test_invariant_1_only_verified_bytes_are_served(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    data = os.urandom(400_000)
    digest = fake_registry.add_blob("library/app", data)
    fake_registry.corrupt_blobs = True
    hold = fake_registry.hold(digest, after=64 * 1024)
    clients = [mirror.client.get(f"/v2/library/app/blobs/{digest}") for _ in range(3)]
    responses = await asyncio.wait_for(asyncio.gather(*clients), 10)  # all three follow the one fetch
    assert fake_registry.count(method="GET", kind="blob") == 1
    hold.release()
    for resp in responses:
        body = await _read_or_none(resp)
        # the last byte is held back until verification: no client ever holds the whole bad body
        assert body is None or len(body) < len(data)
    assert mirror.services.blobs.store.size(digest) is None
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200 and await _read_or_none(resp) is None  # still refused, never cached


async def test_invariant_2_no_reader_sees_a_partial_file(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    data = os.urandom(1_000_000)
    digest = fake_registry.add_blob("library/app", data)
    stall = asyncio.Event()
    fake_registry.stall = stall
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    await resp.content.readexactly(1000)
    store = mirror.services.blobs.store
    assert not store.path(digest).exists()
    assert len(list(store.tmp_dir.iterdir())) == 1
    stall.set()
    assert data[1000:] == await resp.read()
    await mirror.settled()
    assert store.path(digest).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


async def test_invariant_3_concurrent_misses_make_one_upstream_get(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    data = os.urandom(2_000_000)
    digest = fake_registry.add_blob("library/app", data)
    hold = fake_registry.hold(digest, after=64 * 1024)  # the fetch stays in flight until released
    url = f"/v2/library/app/blobs/{digest}"
    # headers go out once a request has joined the fetch: when all 25 have them, all 25 joined it
    responses = await asyncio.wait_for(asyncio.gather(
        *(mirror.client.get(url) for _ in range(20)),
        *(mirror.client.get(url, headers={"Range": "bytes=1000-"}) for _ in range(5)),
    ), 10)
    assert hold.arrived == 1 and fake_registry.count(method="GET", kind="blob") == 1
    assert sorted(r.headers["X-Mirror-Cache"] for r in responses) == ["coalesced"] * 24 + ["miss"]
    hold.release()
    bodies = [await r.read() for r in responses]
    assert bodies[:20] == [data] * 20
    assert bodies[20:] == [data[1000:]] * 5
    assert fake_registry.count(method="GET", kind="blob") == 1
    results = mirror.services.metrics.requests
    assert results.labels("blob", "GET", "miss")._value.get() == 1
    assert results.labels("blob", "GET", "coalesced")._value.get() == 24


async def test_invariant_4_fresh_tag_is_free_and_stale_unchanged_tag_costs_one_head(
    mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    fake_registry.add_image("library/alpine", "3", 2)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    fake_registry.reset_counts()
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert fake_registry.count() == 0
    mirror.clock.advance(TAG_TTL + 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert [(c.method, c.kind) for c in fake_registry.requests] == [("HEAD", "manifest")]


async def test_invariant_5_everything_cached_stays_pullable_with_upstream_down(
    mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    amd = fake_registry.add_image("library/app", None, 2)
    arm = fake_registry.add_image("library/app", None, 2, platform="linux/arm64")
    index = fake_registry.add_index("library/app", "1", [amd, arm])
    paths = ["/v2/library/app/manifests/1", f"/v2/library/app/manifests/{index.digest}"]
    for image in (amd, arm):
        paths.append(f"/v2/library/app/manifests/{image.digest}")
        paths += [f"/v2/library/app/blobs/{d}" for d in (image.config_digest, *image.layer_digests)]
    expected = {}
    for path in paths:
        resp = await mirror.client.get(path, headers=ACCEPT)
        assert resp.status == 200, path
        expected[path] = await resp.read()
    await fake_registry.close()
    mirror.clock.advance(10 * TAG_TTL)
    for path in paths:
        resp = await mirror.client.get(path, headers=ACCEPT)
        assert resp.status == 200, path
        assert await resp.read() == expected[path]


async def test_invariant_6_content_is_served_only_through_repositories_upstream_holds_it_in(
    mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    image = fake_registry.add_image("library/private-ish", "1", 1)
    await mirror.client.get("/v2/library/private-ish/manifests/1", headers=ACCEPT)
    await (await mirror.client.get(f"/v2/library/private-ish/blobs/{image.layer_digests[0]}")).read()
    fake_registry.add_image("library/public", "1", 1)
    for path in (f"/v2/library/public/manifests/{image.digest}",
                 f"/v2/library/public/blobs/{image.layer_digests[0]}",
                 f"/v2/library/public/blobs/{image.config_digest}"):
        resp = await mirror.client.get(path, headers=ACCEPT)
        assert resp.status == 404, path
        assert (await resp.json())["errors"][0]["code"] == ("MANIFEST_UNKNOWN" if "/manifests/" in path else "BLOB_UNKNOWN")


@pytest.mark.parametrize("path, status, code", [
    ("/v2/..%2f..%2fetc/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("/v2/library/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:%2e%2e", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:" + "a" * 63 + "%00", 400, "DIGEST_INVALID"),
    ("/v2/library/app/manifests/..", 404, "NAME_UNKNOWN"),  # sent as /v2/library/app/ (the client resolves ..): no endpoint
    ("/v2/Library/App/manifests/1", 400, "NAME_INVALID"),
])
async def test_invariant_7_bad_input_gets_4xx_with_oci_body_and_touches_no_file(
    mirror: Mirror, fake_registry: FakeRegistry, path: str, status: int, code: str
) -> None:
    opened: list[str] = []
    store = mirror.services.blobs.store
    original = store.path
    store.path = lambda digest: opened.append(digest) or original(digest)  # type: ignore[method-assign]
    resp = await mirror.client.get(path)
    assert resp.status == status
    body = await resp.json()
    assert body["errors"][0]["code"] == code and body["errors"][0]["message"]
    assert opened == []
    assert fake_registry.count() == 0


async def test_invariant_8_memory_stays_flat_with_body_size(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    data = os.urandom(32 << 20)
    digest = fake_registry.add_blob("library/big", data)
    url = f"/v2/library/big/blobs/{digest}"
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(2):  # a miss, then a hit
            resp = await mirror.client.get(url)
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
            assert size == len(data)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # the fake upstream and test client live in this process too; 32 MiB held whole would show
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB while streaming 32 MiB"
