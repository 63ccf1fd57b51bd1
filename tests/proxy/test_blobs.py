"""Blobs: hits from disk, misses streamed from one shared fetch, Range, HEAD, failures."""
from __future__ import annotations

import asyncio
import os

import aiohttp

from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry, digest_of


def _blob(fake: FakeRegistry, size: int = 300_000, repo: str = "library/app") -> tuple[str, bytes]:
    data = os.urandom(size)
    return fake.add_blob(repo, data), data


async def test_miss_then_hit(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    resp = await mirror.client.get(url)
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["Docker-Content-Digest"] == digest
    assert int(resp.headers["Content-Length"]) == len(data)
    fake_registry.reset_counts()
    resp = await mirror.client.get(url)
    assert await resp.read() == data
    assert resp.headers["Docker-Content-Digest"] == digest
    assert fake_registry.count() == 0


async def test_range_on_hit_and_on_miss(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    resp = await mirror.client.get(url, headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert await resp.read() == data[100:200]
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    await mirror.settled()  # the fetch went on without the client that only wanted a range
    for rng, want in (("bytes=1000-", data[1000:]), ("bytes=-10", data[-10:]), ("bytes=0-0", data[:1])):
        resp = await mirror.client.get(url, headers={"Range": rng})
        assert resp.status == 206, rng
        assert await resp.read() == want


async def test_unsatisfiable_and_malformed_ranges_get_416_with_oci_body(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry, 1000)
    url = f"/v2/library/app/blobs/{digest}"
    await (await mirror.client.get(url)).read()
    for rng in ("bytes=5000-6000", "bytes=abc", "bytes=10-5", "bytes=0-1,5-6", "pages=1-2", "bytes=99999999999999999999999-"):
        resp = await mirror.client.get(url, headers={"Range": rng})
        assert resp.status == 416, rng
        assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"


async def test_head_miss_costs_one_head_and_no_fetch(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    resp = await mirror.client.head(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == len(data)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert fake_registry.count(method="GET") == 0
    assert fake_registry.count(method="HEAD", kind="blob") == 1
    assert mirror.services.blobs.store.size(digest) is None


async def test_unknown_blob_is_404_blob_unknown(mirror: Mirror) -> None:
    resp = await mirror.client.get(f"/v2/library/app/blobs/sha256:{'a' * 64}")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    resp = await mirror.client.head(f"/v2/library/app/blobs/sha256:{'a' * 64}")
    assert resp.status == 404


async def _assert_cut_short_and_not_stored(mirror: Mirror, resp: aiohttp.ClientResponse, digest: str,
                                           data: bytes) -> None:
    """The client never got the whole blob, and nothing of it stayed on disk."""
    try:
        body = await resp.read()
    except aiohttp.ClientPayloadError:
        body = None
    assert body is None or len(body) < len(data)
    assert mirror.services.blobs.store.size(digest) is None
    assert list((mirror.data_dir / "tmp").iterdir()) == []


async def test_corrupt_upstream_blob_aborts_client_and_caches_nothing(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    fake_registry.corrupt_blobs = True
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    await _assert_cut_short_and_not_stored(mirror, resp, digest, data)
    assert mirror.services.metrics.digest_mismatches.labels("docker.io")._value.get() == 1
    fake_registry.corrupt_blobs = False
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert await resp.read() == data


async def test_upstream_dropping_mid_body_caches_nothing(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    fake_registry.drop_connection = True
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    await _assert_cut_short_and_not_stored(mirror, resp, digest, data)


async def test_chunked_upstream_without_length_is_streamed(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    fake_registry.omit_content_length = True
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert await resp.read() == data
    await mirror.settled()
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert int(resp.headers["Content-Length"]) == len(data)


async def test_cdn_redirect_is_followed_without_registry_credentials(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.require_auth = True
    fake_registry.redirect_blobs = True
    digest, data = _blob(fake_registry)
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert await resp.read() == data
    assert fake_registry.cdn_auth_headers == [None]


async def test_client_disconnect_does_not_cancel_the_fetch(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry, 1_000_000)
    stall = asyncio.Event()
    fake_registry.stall = stall
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    await resp.content.read(10)
    resp.close()
    stall.set()
    for _ in range(200):
        if mirror.services.blobs.store.size(digest) is not None:
            break
        await asyncio.sleep(0.01)
    assert mirror.services.blobs.store.size(digest) == len(data)


async def test_blob_known_elsewhere_is_confirmed_upstream_before_serving(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    data = os.urandom(5000)
    digest = fake_registry.add_blob("library/one", data)
    assert await (await mirror.client.get(f"/v2/library/one/blobs/{digest}")).read() == data
    # another repository upstream does not hold it: the cached copy must not leak through it
    resp = await mirror.client.get(f"/v2/library/two/blobs/{digest}")
    assert resp.status == 404
    fake_registry.add_blob("library/two", data)
    fake_registry.reset_counts()
    resp = await mirror.client.get(f"/v2/library/two/blobs/{digest}")
    assert await resp.read() == data
    assert fake_registry.count(method="GET") == 0
    assert fake_registry.count(method="HEAD") == 1


async def test_bytes_land_in_the_store_with_their_digest(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    await (await mirror.client.get(f"/v2/library/app/blobs/{digest}")).read()
    await mirror.settled()
    path = mirror.services.blobs.store.path(digest)
    assert digest_of(path.read_bytes()) == digest
    assert path.parent.parent == mirror.data_dir / "content" / "sha256"
