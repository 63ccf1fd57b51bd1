"""Blobs: hits from disk, misses streamed from one shared fetch, Range (one or several), conditionals,
HEAD, lengths, failures, and manifests asked for as blobs."""
from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from mirror.errors import RegistryError
from mirror.proxy.access import principal_for
from mirror.proxy.blobs import BlobAnswer, BlobFetch, BlobHead, BlobHit
from mirror.responses.ranges import MAX_RANGES
from tests.byteranges import parse_byteranges
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
    for rng in ("bytes=5000-6000", "bytes=abc", "bytes=10-5", "bytes=0-1,5-6,x", "pages=1-2",
                "bytes=99999999999999999999999-", "bytes=-0", "bytes=2000-3000,5000-"):
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


async def test_chunked_upstream_without_any_length_is_streamed_chunked(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """The last resort: no manifest names the blob and upstream's HEAD gives no length either."""
    digest, data = _blob(fake_registry)
    fake_registry.omit_content_length = fake_registry.omit_head_content_length = True
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert await resp.read() == data
    assert "Content-Length" not in resp.headers and resp.headers["Transfer-Encoding"] == "chunked"
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
    hold = fake_registry.hold(digest, after=64 * 1024)
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    await resp.content.readexactly(10)
    resp.close()
    hold.release()
    await mirror.settled()
    assert mirror.services.blobs.store.size(digest) == len(data)
    assert fake_registry.count("GET", "blob") == 1


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


# -- kind 7: the blob endpoint serves only what upstream serves as a blob ------------------------

def _index(fake: FakeRegistry) -> tuple[str, bytes, str]:
    """An index tagged 1 in library/app: (its digest, its bytes, its child manifest's digest)."""
    image = fake.add_image("library/app", None, 1)
    index = fake.add_index("library/app", "1", [image])
    return index.digest, index.body, image.digest


async def test_kind7_a_manifest_digest_asked_as_a_blob_is_blob_unknown(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    index, body, child = _index(fake_registry)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    assert (await mirror.client.get(f"/v2/library/app/manifests/{child}")).status == 200
    for digest in (index, child):
        url = f"/v2/library/app/blobs/{digest}"
        resp = await mirror.client.get(url)
        got = await resp.read()
        assert resp.status == 404 and resp.content_type == "application/json"
        assert json.loads(got)["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert body not in got and b"schemaVersion" not in got  # not one byte of the manifest
        head = await mirror.client.head(url)
        assert head.status == 404 and await head.read() == b""
    # so does a manifest a client asks for through a repository it was never fetched in
    assert (await mirror.client.get(f"/v2/library/other/blobs/{index}")).status == 404


async def test_kind7_a_manifest_digest_upstream_serves_as_a_blob_is_served(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    index, body, _child = _index(fake_registry)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    fake_registry.add_blob("library/app", body)  # this upstream answers /blobs/ for it as well
    fake_registry.reset_counts()
    url = f"/v2/library/app/blobs/{index}"
    resp = await mirror.client.get(url)
    assert resp.status == 200 and await resp.read() == body
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert fake_registry.count("HEAD", "blob") == 1 and fake_registry.count("GET") == 0
    head = await mirror.client.head(url)
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(body)
    assert fake_registry.count("HEAD", "blob") == 1  # upstream's word is remembered


# -- kind 9: every blob answer carries Content-Length ---------------------------------------------

async def test_kind9_chunked_upstream_length_comes_from_a_seen_manifest(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "1", [os.urandom(200_000), os.urandom(300_000), os.urandom(1000)])
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    fake_registry.omit_content_length = fake_registry.omit_head_content_length = True
    fake_registry.reset_counts()
    (whole, ranged, headed) = zip(image.layer_digests, image.layers)
    url = "/v2/library/app/blobs/{}".format
    resp = await mirror.client.get(url(whole[0]))
    assert int(resp.headers["Content-Length"]) == len(whole[1]) and await resp.read() == whole[1]
    resp = await mirror.client.get(url(ranged[0]), headers={"Range": "bytes=100-199"})
    assert resp.status == 206 and resp.headers["Content-Length"] == "100"
    assert await resp.read() == ranged[1][100:200]
    resp = await mirror.client.head(url(headed[0]))
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(headed[1])
    assert fake_registry.count("HEAD", "blob") == 1  # the client's own HEAD; none to learn a size
    await mirror.settled()
    for digest, data in (whole, ranged):  # warm, the same
        resp = await mirror.client.get(url(digest))
        assert int(resp.headers["Content-Length"]) == len(data) and await resp.read() == data
        resp = await mirror.client.head(url(digest))
        assert int(resp.headers["Content-Length"]) == len(data)


async def test_kind9_chunked_upstream_length_comes_from_an_upstream_head(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    other, other_data = _blob(fake_registry)
    fake_registry.omit_content_length = True
    url = f"/v2/library/app/blobs/{digest}"
    resp = await mirror.client.get(url)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(data)
    assert await resp.read() == data
    assert fake_registry.count("HEAD", "blob") == 1 and fake_registry.count("GET", "blob") == 1
    resp = await mirror.client.get(f"/v2/library/app/blobs/{other}", headers={"Range": "bytes=-10"})
    assert resp.status == 206 and resp.headers["Content-Length"] == "10"
    assert resp.headers["Content-Range"] == f"bytes {len(other_data) - 10}-{len(other_data) - 1}/{len(other_data)}"
    assert await resp.read() == other_data[-10:]
    await mirror.settled()
    assert mirror.services.blobs.store.size(digest) == len(data)


@pytest.mark.parametrize("claimed", [-1, +1])
async def test_kind9_a_blob_whose_size_differs_from_its_descriptor_is_a_mismatch(
        mirror: Mirror, fake_registry: FakeRegistry, claimed: int) -> None:
    layer = os.urandom(100_000)
    digest = fake_registry.add_blob("library/app", layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                                      "digest": fake_registry.add_blob("library/app", b"{}")},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "size": len(layer) + claimed, "digest": digest}]}).encode()
    fake_registry.add_manifest("library/app", manifest, "application/vnd.oci.image.manifest.v1+json", "1")
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    fake_registry.omit_content_length = True
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert int(resp.headers["Content-Length"]) == len(layer) + claimed
    await _assert_cut_short_and_not_stored(mirror, resp, digest, layer)
    await mirror.settled()
    assert mirror.services.metrics.digest_mismatches.labels("docker.io")._value.get() == 1


# -- kind 10: several ranges, conditionals, one ETag ----------------------------------------------

def _podman_ranges(size: int) -> tuple[str, list[tuple[int, int]]]:
    """Two ranges near the end of a blob with a small gap, as podman 5 reads a zstd:chunked TOC."""
    a, b, c, d = size - 40_000, size - 20_001, size - 20_000 + 8, size - 1
    return f"bytes={a}-{b},{c}-{d}", [(a, b + 1), (c, d + 1)]


def _assert_multipart(resp: aiohttp.ClientResponse, body: bytes, data: bytes, want: list[tuple[int, int]]) -> None:
    assert resp.status == 206
    assert int(resp.headers["Content-Length"]) == len(body)
    assert "Content-Range" not in resp.headers
    assert resp.headers["ETag"] == resp.headers["Docker-Content-Digest"].join('""')
    parts = parse_byteranges(resp.headers["Content-Type"], body)
    assert parts == [("application/octet-stream", f"bytes {a}-{b - 1}/{len(data)}", data[a:b]) for a, b in want]


async def test_kind10_two_ranges_on_a_hit_get_multipart_byteranges(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    assert await (await mirror.client.get(url)).read() == data
    await mirror.settled()
    fake_registry.reset_counts()
    header, want = _podman_ranges(len(data))
    for rng, expected in ((header, want), ("bytes=0-9, 20-29 ,-5", [(0, 10), (20, 30), (len(data) - 5, len(data))])):
        resp = await mirror.client.get(url, headers={"Range": rng})
        assert resp.headers["X-Mirror-Cache"] == "hit"
        _assert_multipart(resp, await resp.read(), data, expected)
    assert fake_registry.count() == 0


async def test_kind10_multipart_parses_with_aiohttps_reader(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry, 5000)
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=4000-,0-99"})
    reader = aiohttp.MultipartReader.from_response(resp)
    got = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        got.append((part.headers["Content-Range"], bytes(await part.read())))
    assert got == [("bytes 4000-4999/5000", data[4000:]), ("bytes 0-99/5000", data[:100])]


async def test_kind10_two_ranges_on_a_miss_wait_for_their_bytes_and_the_whole_blobs_verification(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry, 1_000_000)
    fake_registry.stall = stall = asyncio.Event()  # upstream sends its first 64 KiB, then waits
    header, want = "bytes=100-199,900000-900099", [(100, 200), (900_000, 900_100)]
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})
    assert resp.status == 206 and resp.headers["X-Mirror-Cache"] == "miss"
    first = await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 5)  # the first part's head
    assert f"Content-Range: bytes 100-199/{len(data)}".encode() in first
    assert await asyncio.wait_for(resp.content.readexactly(99), 5) == data[100:199]  # it arrived already
    with pytest.raises(asyncio.TimeoutError):  # its last byte waits until the whole blob hashed right
        await asyncio.wait_for(resp.content.readexactly(1), 0.1)
    stall.set()
    rest = await asyncio.wait_for(resp.read(), 5)
    _assert_multipart(resp, first + data[100:199] + rest, data, want)
    await mirror.settled()
    assert fake_registry.count("GET", "blob") == 1
    assert mirror.services.blobs.store.size(digest) == len(data)


async def test_kind10_ranges_of_a_fetch_others_started(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry, 1_000_000)
    hold = fake_registry.hold(digest, after=64 * 1024)
    url = f"/v2/library/app/blobs/{digest}"
    whole = await mirror.client.get(url)
    resp = await asyncio.wait_for(mirror.client.get(url, headers={"Range": "bytes=999990-,0-9"}), 5)
    assert resp.headers["X-Mirror-Cache"] == "coalesced"  # it joined the fetch still held upstream
    hold.release()
    _assert_multipart(resp, await resp.read(), data, [(999_990, 1_000_000), (0, 10)])
    assert await whole.read() == data
    assert fake_registry.count("GET", "blob") == 1


@pytest.mark.parametrize("state", ["hit", "miss"])
async def test_kind10_one_satisfiable_range_of_several_is_a_plain_206(
        mirror: Mirror, fake_registry: FakeRegistry, state: str) -> None:
    digest, data = _blob(fake_registry, 1000)
    url = f"/v2/library/app/blobs/{digest}"
    if state == "hit":
        await (await mirror.client.get(url)).read()
    resp = await mirror.client.get(url, headers={"Range": "bytes=5000-6000, 10-19"})
    assert resp.status == 206 and resp.headers["Content-Range"] == "bytes 10-19/1000"
    assert resp.headers["Content-Type"] == "application/octet-stream" and resp.headers["Content-Length"] == "10"
    assert await resp.read() == data[10:20]


@pytest.mark.parametrize("state", ["hit", "miss"])
async def test_kind10_bad_ranges_get_416_or_200_never_5xx(mirror: Mirror, fake_registry: FakeRegistry, state: str) -> None:
    digest, data = _blob(fake_registry, 10_000)
    url = f"/v2/library/app/blobs/{digest}"
    if state == "hit":
        await (await mirror.client.get(url)).read()
        await mirror.settled()
    for rng in ("bytes=20000-30000,40000-", "bytes=0-9,30-20",
                "bytes=-0,-0", "bytes=0-9,,x"):
        resp = await mirror.client.get(url, headers={"Range": rng})
        assert resp.status == 416, rng[:50]
        assert resp.headers["Content-Range"] == "bytes */10000"
        assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"
    hundreds = "bytes=" + ",".join(f"{i * 20}-{i * 20 + 9}" for i in range(300))
    # too many, or overlaps adding up to more than the blob
    for rng in (hundreds, "bytes=0-,0-,0-", "bytes=0-" + "9" * 5000 + ",1-2"):
        resp = await mirror.client.get(url, headers={"Range": rng})
        assert resp.status == 200 and await resp.read() == data  # the whole blob, as if asked so
    resp = await mirror.client.get(url, headers={"Range": "bytes=0-99,50-149"})  # overlapping, as Go serves them
    _assert_multipart(resp, await resp.read(), data, [(0, 100), (50, 150)])
    many = "bytes=" + ",".join(f"{i * 20}-{i * 20 + 9}" for i in range(MAX_RANGES))
    resp = await mirror.client.get(url, headers={"Range": many})
    _assert_multipart(resp, await resp.read(), data, [(i * 20, i * 20 + 10) for i in range(MAX_RANGES)])


@pytest.mark.parametrize("state", ["hit", "miss"])
async def test_kind10_head_with_ranges_answers_as_get_without_a_body(
        mirror: Mirror, fake_registry: FakeRegistry, state: str) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    if state == "hit":
        await (await mirror.client.get(url)).read()
        await mirror.settled()
    header, _want = _podman_ranges(len(data))
    head = await mirror.client.head(url, headers={"Range": header})
    assert head.status == 206 and await head.read() == b""
    get = await mirror.client.get(url, headers={"Range": header})
    body = await get.read()
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(body))
    assert head.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    head = await mirror.client.head(url, headers={"Range": "bytes=5-9"})
    assert head.status == 206 and head.headers["Content-Range"] == f"bytes 5-9/{len(data)}"
    assert head.headers["Content-Length"] == "5"
    head = await mirror.client.head(url, headers={"Range": "bytes=900000-"})
    assert head.status == 416 and head.headers["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("state", ["hit", "miss"])
async def test_kind10_if_range_and_if_none_match_compare_with_the_digest_etag(
        mirror: Mirror, fake_registry: FakeRegistry, state: str) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    etag = f'"{digest}"'
    if state == "hit":
        await (await mirror.client.get(url)).read()
        await mirror.settled()
    resp = await mirror.client.get(url, headers={"Range": "bytes=0-9,20-29", "If-Range": etag})
    _assert_multipart(resp, await resp.read(), data, [(0, 10), (20, 30)])
    for other in ('"sha256:' + "0" * 64 + '"', f"W/{etag}", "Tue, 15 Nov 1994 08:12:31 GMT"):
        resp = await mirror.client.get(url, headers={"Range": "bytes=0-9,20-29", "If-Range": other})
        assert resp.status == 200 and await resp.read() == data, other
        assert resp.headers["ETag"] == etag and int(resp.headers["Content-Length"]) == len(data)
    for match in (etag, f"W/{etag}", "*", f'"x", {etag}'):
        for method in ("GET", "HEAD"):
            resp = await mirror.client.request(method, url, headers={"If-None-Match": match, "Range": "bytes=0-1"})
            assert resp.status == 304 and await resp.read() == b"", (method, match)
            assert resp.headers["ETag"] == etag
    resp = await mirror.client.get(url, headers={"If-None-Match": '"sha256:' + "0" * 64 + '"'})
    assert resp.status == 200 and await resp.read() == data


async def test_kind10_hits_and_misses_have_the_same_etag(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    miss = await mirror.client.get(url)
    await miss.read()
    await mirror.settled()
    hit = await mirror.client.get(url)
    assert await hit.read() == data
    assert (miss.headers["X-Mirror-Cache"], hit.headers["X-Mirror-Cache"]) == ("miss", "hit")
    assert miss.headers["ETag"] == hit.headers["ETag"] == f'"{digest}"'
    for name in ("Content-Type", "Accept-Ranges", "Docker-Content-Digest", "Cache-Control", "Content-Length"):
        assert miss.headers[name] == hit.headers[name], name
    assert "Last-Modified" not in hit.headers


async def test_whole_and_ranged_hits_go_out_with_sendfile(
        mirror: Mirror, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    digest, data = _blob(fake_registry)
    url = f"/v2/library/app/blobs/{digest}"
    await (await mirror.client.get(url)).read()
    await mirror.settled()
    loop = asyncio.get_running_loop()
    sent: list[tuple[int, int]] = []
    real = loop.sendfile

    async def sendfile(transport, file, offset=0, count=None, **kw):  # type: ignore[no-untyped-def]
        sent.append((offset, count))
        return await real(transport, file, offset, count, **kw)

    monkeypatch.setattr(loop, "sendfile", sendfile)
    assert await (await mirror.client.get(url)).read() == data
    assert await (await mirror.client.get(url, headers={"Range": "bytes=10-19"})).read() == data[10:20]
    await (await mirror.client.get(url, headers={"Range": "bytes=10-19,30-39"})).read()
    assert sent == [(0, len(data)), (10, 10), (10, 10), (30, 10)]



@pytest.mark.parametrize("header", ["bytes=0-99", "bytes=0-99,1000-1099"])
async def test_a_range_of_a_corrupt_blob_still_arriving_never_arrives_whole(
        mirror: Mirror, fake_registry: FakeRegistry, header: str) -> None:
    """Bytes whose blob has not been verified are never served whole, in a range either: a range's
    last byte waits for the verification, and a mismatch cuts the answer short."""
    digest, _data = _blob(fake_registry, 300_000)
    fake_registry.corrupt_blobs = True  # one byte flipped in the middle, past the ranges asked for
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})
    assert resp.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)
    await mirror.settled()
    assert mirror.services.blobs.store.size(digest) is None


async def _get(mirror: Mirror, digest: str, head: bool = False) -> BlobAnswer:
    """The service's answer for library/app, asked directly: no HTTP request is involved."""
    upstream, repo = mirror.services.router.route("library/app", None)
    return await mirror.services.blobs.get(upstream, repo, digest, principal_for(None, upstream), head=head)


async def test_the_service_answers_with_domain_results(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """A HEAD miss is upstream's size, a GET miss the started fetch, then the stored file, open."""
    digest, data = _blob(fake_registry)
    head = await _get(mirror, digest, head=True)
    assert head == BlobHead(digest, len(data), "miss") and fake_registry.count(method="GET") == 0

    miss = await _get(mirror, digest)
    assert isinstance(miss, BlobFetch) and (miss.result, miss.digest, miss.size) == ("miss", digest, len(data))
    miss.close()  # its reader leaves; the fetch goes on and stores the blob
    await mirror.settled()

    hit = await _get(mirror, digest)
    assert isinstance(hit, BlobHit) and (hit.result, hit.digest, hit.size) == ("hit", digest, len(data))
    with hit.file:
        assert hit.file.read() == data
    assert fake_registry.count(method="GET", kind="blob") == 1


async def test_the_service_joins_a_running_fetch(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data = _blob(fake_registry)
    fake_registry.chunk_delay = 0.05  # still arriving while the second request comes
    first = await _get(mirror, digest)
    second = await _get(mirror, digest)
    try:
        assert isinstance(first, BlobFetch) and isinstance(second, BlobFetch)
        assert (first.result, second.result) == ("miss", "coalesced") and first.fetch is second.fetch
    finally:
        first.close()
        second.close()
    await mirror.settled()
    assert fake_registry.count(method="GET", kind="blob") == 1


async def test_the_service_refuses_what_upstream_lacks_with_blob_unknown(mirror: Mirror) -> None:
    for head in (False, True):
        with pytest.raises(RegistryError) as info:
            await _get(mirror, f"sha256:{'a' * 64}", head=head)
        assert (info.value.status, info.value.code) == (404, "BLOB_UNKNOWN")
    assert not mirror.services.blobs.inflight.temp_files()
