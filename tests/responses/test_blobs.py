"""Blob answers as responses, without a server: headers, conditionals, ranges, and who closes what."""
from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from mirror.errors import RegistryError
from mirror.proxy.blobs import BlobFetch, BlobHead, BlobHit
from mirror.proxy.inflight import Fetch
from mirror.responses.blobs import SentFile, respond

DIGEST = f"sha256:{'b' * 64}"
ETAG = f'"{DIGEST}"'
PATH = f"/v2/library/app/blobs/{DIGEST}"


def _hit(tmp_path: Path, size: int = 100) -> BlobHit:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * size)
    return BlobHit(DIGEST, size, path.open("rb"))


def _fetch(size: int | None) -> BlobFetch:
    fetch = Fetch(DIGEST, "docker.io", "library/app").join()
    fetch.size = size
    return BlobFetch(fetch, "miss")


async def test_a_stored_blob_goes_out_as_a_sent_file_that_owns_it(tmp_path: Path) -> None:
    hit = _hit(tmp_path)
    resp = await respond(make_mocked_request("GET", PATH, headers={"Range": "bytes=10-19"}), hit)
    assert isinstance(resp, SentFile) and not hit.file.closed
    assert (resp.status, resp.content_length, resp.headers["Content-Range"]) == (206, 10, "bytes 10-19/100")
    assert resp.headers["ETag"] == ETAG and resp.headers["Docker-Content-Digest"] == DIGEST
    hit.close()


@pytest.mark.parametrize("method, headers, status", [
    ("HEAD", {}, 200),
    ("GET", {"If-None-Match": ETAG}, 304),
    ("HEAD", {"If-None-Match": "*"}, 304),
])
async def test_a_stored_blob_without_a_body_is_closed_at_once(
        tmp_path: Path, method: str, headers: dict[str, str], status: int) -> None:
    hit = _hit(tmp_path)
    resp = await respond(make_mocked_request(method, PATH, headers=headers), hit)
    assert not isinstance(resp, SentFile) and hit.file.closed
    assert resp.status == status and resp.headers["ETag"] == ETAG
    if status == 200:
        assert resp.content_length == 100


async def test_an_unsatisfiable_range_closes_the_file_and_leaves_the_fetch(tmp_path: Path) -> None:
    hit, miss = _hit(tmp_path), _fetch(100)
    for answer in (hit, miss):
        with pytest.raises(RegistryError) as info:
            await respond(make_mocked_request("GET", PATH, headers={"Range": "bytes=500-"}), answer)
        assert (info.value.status, info.value.headers["Content-Range"]) == (416, "bytes */100")
    assert hit.file.closed and miss.fetch._readers == 0


async def test_a_fetch_not_modified_is_left_without_waiting_for_bytes() -> None:
    miss = _fetch(100)
    resp = await respond(make_mocked_request("GET", PATH, headers={"If-None-Match": ETAG}), miss)
    assert resp.status == 304 and miss.fetch._readers == 0


@pytest.mark.parametrize("size, length", [(1234, 1234), (None, None)])
async def test_a_head_miss_has_upstreams_size_or_no_length(size: int | None, length: int | None) -> None:
    request = make_mocked_request("HEAD", PATH, headers={"Range": "bytes=0-9"})
    resp = await respond(request, BlobHead(DIGEST, size))
    # a Range is served only where the size is known
    assert resp.status == (206 if size else 200) and resp.content_length == (10 if size else None)
    assert resp.headers["ETag"] == ETAG and resp.headers["Accept-Ranges"] == "bytes"
