"""The bucket of a fleet against a real S3-compatible server (JuiceFS's gateway, MinIO's code):
objects appear only whole, failed uploads leave nothing, and every way a bucket cannot be used
is refused at start with what to fix."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from mirror.metrics import Metrics
from mirror.storage import bucket as bucket_module
from mirror.storage.bucket import Bucket, BucketError, Chunks, NotInBucket
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.registry import digest_of
from tests.integration.registry import free_port
from tests.integration.s3 import S3Gateway

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def bucket(s3: S3Gateway) -> AsyncIterator[Bucket]:
    b = Bucket(s3.config(), Metrics())
    await b.open()
    yield b
    await b.close()


@pytest.fixture
def proxy(s3: S3Gateway) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.endpoint_url)
    p.keep_host = True
    p.start()
    yield p
    p.stop()


def file_chunks(file: BinaryIO) -> Chunks:
    """A stored file's bytes, a MiB at a time."""
    async def chunks(offset: int, length: int) -> AsyncIterator[bytes]:
        for position in range(offset, offset + length, 1 << 20):
            yield os.pread(file.fileno(), min(1 << 20, offset + length - position), position)
    return chunks


async def _uploads(s3: S3Gateway, prefix: str) -> list[Any]:
    async with s3.client() as client:
        return (await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)).get("Uploads", [])


@pytest.mark.parametrize("size", [0, 1000, bucket_module.PART_SIZE + 12345])
async def test_upload_then_size_download_and_ranges(bucket: Bucket, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = digest_of(data)
    assert await bucket.size(digest) is None
    with path.open("rb") as file:
        await bucket.upload(digest, size, file_chunks(file))
    assert await bucket.size(digest) == size
    async with await bucket.download(digest) as resp:
        assert await resp.read() == data
    if size:
        async with await bucket.download(digest, start=size // 2) as resp:
            assert (resp.status, await resp.read()) == (206, data[size // 2:])
    assert await bucket.read(digest, 1 << 30) == data
    assert await bucket.read(digest, max(0, size - 1)) is None if size else True


async def test_an_absent_object_is_none_or_file_not_found(bucket: Bucket) -> None:
    digest = digest_of(b"absent")
    assert await bucket.size(digest) is None
    assert await bucket.read(digest, 100) is None
    with pytest.raises(NotInBucket):
        await bucket.download(digest)


async def test_keys_come_from_validated_digests_only(bucket: Bucket) -> None:
    for bad in ("sha256:../../x", "sha256:" + "A" * 64, "md5:" + "a" * 32, "../" + "a" * 64):
        with pytest.raises(ValueError):
            bucket.key(bad)
    assert bucket.key("sha256:" + "a" * 64) == f"{bucket.config.prefix}content/sha256/{'a' * 64}"


async def test_objects_delete_and_use_markers(bucket: Bucket, tmp_path: Path) -> None:
    blobs = [os.urandom(100 + i) for i in range(3)]
    for data in blobs:
        await bucket.upload_bytes(digest_of(data), data)
    before = time.time()
    await bucket.mark_used(digest_of(blobs[0]))
    found = {o.digest: o for o in await bucket.objects()}
    assert {d: o.size for d, o in found.items()} == {digest_of(b): len(b) for b in blobs}
    assert found[digest_of(blobs[0])].used >= int(before)
    await bucket.delete([digest_of(blobs[0]), digest_of(b"never there")])
    assert {o.digest for o in await bucket.objects()} == {digest_of(b) for b in blobs[1:]}
    assert not [k for k, _, _ in await bucket._list("used/")]  # the marker went with it


async def test_a_multipart_upload_that_fails_midway_is_aborted_and_publishes_nothing(
        s3: S3Gateway, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bucket_module, "PART_SIZE", 5 << 20)  # S3's smallest part
    data = os.urandom(16 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    b = Bucket(s3.config(endpoint_url=proxy.url, read_timeout=2.0), Metrics())
    await b.open()
    try:
        proxy.status, proxy.status_methods = 500, {"PUT"}  # the parts fail; creating and aborting work
        with path.open("rb") as file, pytest.raises(BucketError, match="upload_part .* failed 3 times"):
            await b.upload(digest_of(data), len(data), file_chunks(file))
        proxy.reset()
        assert await b.size(digest_of(data)) is None
        assert await _uploads(s3, b.config.prefix) == []
    finally:
        await b.close()


async def test_sweep_aborts_uploads_a_crash_left_and_spares_running_ones(s3: S3Gateway, bucket: Bucket) -> None:
    async with s3.client() as client:
        await client.create_multipart_upload(Bucket=s3.bucket, Key=bucket.key(digest_of(b"left behind")))
    assert await bucket.sweep(time.time()) == 0  # young: may be a replica's upload in progress
    assert len(await _uploads(s3, bucket.config.prefix)) == 1
    assert await bucket.sweep(time.time() + bucket_module.ABANDONED_AFTER + 60) == 1
    assert await _uploads(s3, bucket.config.prefix) == []


async def _check(config: Any) -> str:
    b = Bucket(config, Metrics())
    await b.open()
    try:
        with pytest.raises(BucketError) as caught:
            await b.check()
        return str(caught.value)
    finally:
        await b.close()


async def test_start_up_check_names_what_is_wrong(s3: S3Gateway, proxy: FaultProxy) -> None:
    ok = s3.config()
    b = Bucket(ok, Metrics())
    await b.open()
    await b.check()  # a usable bucket passes
    await b.close()
    assert "does not exist" in await _check(dataclasses.replace(ok, bucket="no-such-bucket"))
    assert "access denied: check the keys" in await _check(dataclasses.replace(ok, secret_access_key="wrong" * 4))
    assert "access denied: check the keys" in await _check(dataclasses.replace(ok, access_key_id="nobody"))
    unreachable = await _check(dataclasses.replace(ok, endpoint_url=f"http://127.0.0.1:{free_port()}"))
    assert "cannot use bucket" in unreachable and "Could not connect" in unreachable
    proxy.status, proxy.status_methods = 403, {"PUT"}
    refused = await _check(dataclasses.replace(ok, endpoint_url=proxy.url))
    assert "refuses writes" in refused
    proxy.status, proxy.status_methods = 500, None
    assert "cannot use bucket" in await _check(dataclasses.replace(ok, endpoint_url=proxy.url))


def test_mirror_serve_refuses_a_bucket_it_cannot_use_and_says_why(s3: S3Gateway, tmp_path: Path) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:{free_port()}"
data_dir = "{tmp_path / 'data'}"
workers = 1
[storage]
backend = "s3"
[storage.s3]
endpoint_url = "{s3.endpoint_url}"
bucket = "missing-bucket"
access_key_id = "{s3.access_key}"
secret_access_key = "{s3.secret_key}"
""")
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "s3://missing-bucket/" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
