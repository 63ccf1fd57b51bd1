"""What the S3 server of the integration tests (JuiceFS's gateway, MinIO's code) does, through
aiobotocore: the operations a content store on S3 relies on, the exact error codes it maps to
messages, and where this server departs from AWS S3 (so tests against it cannot catch those).
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError

from tests.integration.s3 import S3Gateway
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIN_PART = 5 * 1024 * 1024  # S3's smallest part but the last


@pytest.fixture
async def client(s3: S3Gateway) -> AsyncIterator[Any]:
    async with s3.client() as c:
        yield c


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses: the gateway is shared by the whole run."""
    return f"t{secrets.token_hex(6)}/"


def error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    """The S3 error code and HTTP status of a refusal."""
    response = exc.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


async def read(client: Any, bucket: str, key: str, **kwargs: Any) -> tuple[int, bytes]:
    answer = await client.get_object(Bucket=bucket, Key=key, **kwargs)
    async with answer["Body"] as body:
        return answer["ResponseMetadata"]["HTTPStatusCode"], await body.read()


async def test_put_get_head_delete(s3: S3Gateway, client: Any, prefix: str) -> None:
    key, data = f"{prefix}blob", b"hello world"
    put = await client.put_object(Bucket=s3.bucket, Key=key, Body=data)
    # with --keep-etag, a single PUT's ETag is the content's MD5, as on S3
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'

    assert await read(client, s3.bucket, key) == (200, data)
    head = await client.head_object(Bucket=s3.bucket, Key=key)
    assert (head["ContentLength"], head["ETag"]) == (len(data), put["ETag"])

    deleted = await client.delete_object(Bucket=s3.bucket, Key=key)
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as head_gone:
        await client.head_object(Bucket=s3.bucket, Key=key)
    assert error(head_gone) == ("404", 404)  # HEAD answers carry no body, so no S3 code
    with pytest.raises(ClientError) as get_gone:
        await client.get_object(Bucket=s3.bucket, Key=key)
    assert error(get_gone) == ("NoSuchKey", 404)
    # deleting what is not there succeeds, as on S3: deletes are idempotent
    again = await client.delete_object(Bucket=s3.bucket, Key=key)
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 204


async def test_list_with_prefix_pages_by_max_keys(s3: S3Gateway, client: Any, prefix: str) -> None:
    keys = [f"{prefix}k/{i}" for i in range(5)]
    for key in keys:
        await client.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
    await client.put_object(Bucket=s3.bucket, Key=f"{prefix}other", Body=b"x")

    listed, pages, token = [], 0, None
    while True:
        more = {"ContinuationToken": token} if token else {}
        page = await client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}k/", MaxKeys=2, **more)
        pages += 1
        assert len(page["Contents"]) <= 2
        listed += [entry["Key"] for entry in page["Contents"]]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
        assert pages < 10
    assert (listed, pages) == (keys, 3)  # in key order, 2 + 2 + 1


async def test_range_get_answers_206_with_exactly_those_bytes(s3: S3Gateway, client: Any, prefix: str) -> None:
    key, data = f"{prefix}blob", bytes(range(256)) * 4
    await client.put_object(Bucket=s3.bucket, Key=key, Body=data)

    answer = await client.get_object(Bucket=s3.bucket, Key=key, Range="bytes=10-19")
    async with answer["Body"] as body:
        assert (answer["ResponseMetadata"]["HTTPStatusCode"], await body.read()) == (206, data[10:20])
    assert answer["ContentRange"] == f"bytes 10-19/{len(data)}"
    assert await read(client, s3.bucket, key, Range=f"bytes={len(data) - 3}-") == (206, data[-3:])

    with pytest.raises(ClientError) as beyond:
        await client.get_object(Bucket=s3.bucket, Key=key, Range=f"bytes={len(data)}-{len(data) + 9}")
    assert error(beyond) == ("InvalidRange", 416)


async def upload_parts(client: Any, bucket: str, key: str, upload_id: str, parts: list[bytes]) -> list[dict[str, Any]]:
    done = []
    for number, part in enumerate(parts, start=1):
        answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part)
        done.append({"PartNumber": number, "ETag": answer["ETag"]})
    return done


async def test_multipart_object_is_invisible_until_completed(s3: S3Gateway, client: Any, prefix: str) -> None:
    """Completing a multipart upload is the commit: before it, neither HEAD nor a listing shows the key."""
    key = f"{prefix}blob"
    parts = [b"a" * MIN_PART, b"bc"]
    upload_id = (await client.create_multipart_upload(Bucket=s3.bucket, Key=key))["UploadId"]
    done = await upload_parts(client, s3.bucket, key, upload_id, parts)

    with pytest.raises(ClientError) as not_yet:
        await client.head_object(Bucket=s3.bucket, Key=key)
    assert error(not_yet) == ("404", 404)
    assert "Contents" not in await client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    listed = await client.list_parts(Bucket=s3.bucket, Key=key, UploadId=upload_id)
    assert [(p["PartNumber"], p["Size"]) for p in listed["Parts"]] == [(1, MIN_PART), (2, 2)]

    completed = await client.complete_multipart_upload(
        Bucket=s3.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done})
    assert await read(client, s3.bucket, key) == (200, b"".join(parts))
    # The ETag of a multipart object is S3's: the MD5 of the parts' MD5s, then "-<parts>";
    # not the content's MD5, so it can never stand in for a digest check.
    part_md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    assert completed["ETag"] == f'"{hashlib.md5(part_md5s).hexdigest()}-{len(parts)}"'
    assert (await client.head_object(Bucket=s3.bucket, Key=key))["ETag"] == completed["ETag"]
    uploads = await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)
    assert "Uploads" not in uploads


async def test_aborted_multipart_upload_leaves_nothing(s3: S3Gateway, client: Any, prefix: str) -> None:
    key = f"{prefix}blob"
    upload_id = (await client.create_multipart_upload(Bucket=s3.bucket, Key=key))["UploadId"]
    await upload_parts(client, s3.bucket, key, upload_id, [b"a" * 10])

    await client.abort_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=upload_id)
    with pytest.raises(ClientError) as nothing:
        await client.head_object(Bucket=s3.bucket, Key=key)
    assert error(nothing) == ("404", 404)
    with pytest.raises(ClientError) as gone:
        await client.list_parts(Bucket=s3.bucket, Key=key, UploadId=upload_id)
    assert error(gone) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError) as twice:
        await client.abort_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=upload_id)
    assert error(twice) == ("NoSuchUpload", 404)


async def test_abandoned_upload_is_listed_until_aborted(s3: S3Gateway, client: Any, prefix: str) -> None:
    """What a sweep of uploads a crash left behind sees: key, id and start time of each."""
    key = f"{prefix}blob"
    upload_id = (await client.create_multipart_upload(Bucket=s3.bucket, Key=key))["UploadId"]
    await upload_parts(client, s3.bucket, key, upload_id, [b"a" * 10])

    listed = (await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix))["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in listed] == [(key, upload_id)]
    assert listed[0]["Initiated"].tzinfo is not None
    # an upload in progress is not an object
    assert "Contents" not in await client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)

    await client.abort_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=upload_id)
    assert "Uploads" not in await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)


async def test_parts_under_5_mib_are_accepted_unlike_s3(s3: S3Gateway, client: Any, prefix: str) -> None:
    """AWS S3 refuses to complete with a part but the last under 5 MiB (EntityTooSmall); this
    server does not check, so tests here cannot catch a store that cuts parts too small."""
    key = f"{prefix}blob"
    upload_id = (await client.create_multipart_upload(Bucket=s3.bucket, Key=key))["UploadId"]
    done = await upload_parts(client, s3.bucket, key, upload_id, [b"a" * 10, b"bc"])
    await client.complete_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=upload_id,
                                           MultipartUpload={"Parts": done})
    assert await read(client, s3.bucket, key) == (200, b"a" * 10 + b"bc")


async def test_copy_then_delete_source(s3: S3Gateway, client: Any, prefix: str) -> None:
    """The other commit: upload to a temporary key, verify, copy server-side, delete the temporary."""
    source, target, data = f"{prefix}tmp", f"{prefix}final", b"content" * 100
    put = await client.put_object(Bucket=s3.bucket, Key=source, Body=data)

    copied = await client.copy_object(Bucket=s3.bucket, Key=target, CopySource={"Bucket": s3.bucket, "Key": source})
    assert copied["CopyObjectResult"]["ETag"] == put["ETag"]
    await client.delete_object(Bucket=s3.bucket, Key=source)

    assert await read(client, s3.bucket, target) == (200, data)
    with pytest.raises(ClientError) as gone:
        await client.head_object(Bucket=s3.bucket, Key=source)
    assert error(gone) == ("404", 404)


async def test_put_ignores_if_none_match(s3: S3Gateway, client: Any, prefix: str) -> None:
    """No conditional create: `If-None-Match: *` (AWS S3 answers 412 PreconditionFailed since
    2024) is ignored and the PUT replaces the object, so "first writer wins" cannot rest on it."""
    key = f"{prefix}blob"
    await client.put_object(Bucket=s3.bucket, Key=key, Body=b"first")
    await client.put_object(Bucket=s3.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert await read(client, s3.bucket, key) == (200, b"second")


async def test_presigned_get_works_over_plain_http_and_expires(s3: S3Gateway, client: Any, prefix: str) -> None:
    key, data = f"{prefix}blob", b"0123456789"
    await client.put_object(Bucket=s3.bucket, Key=key, Body=data)
    params = {"Bucket": s3.bucket, "Key": key}
    url = await client.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    assert "X-Amz-Signature=" in url  # signature V4
    # signed at whole seconds, so this one may be dead at once or live up to 1 s
    short = await client.generate_presigned_url("get_object", Params=params, ExpiresIn=1)

    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Range": "bytes=2-4"}) as ranged:
            assert (ranged.status, await ranged.read()) == (206, data[2:5])
        async with http.get(url) as whole:
            assert (whole.status, await whole.read()) == (200, data)

        async def status() -> tuple[int, str]:
            async with http.get(short) as answer:
                return answer.status, await answer.text()

        # nothing announces the end of a URL's life, so poll (bounded)
        expired, body = await wait_until(status, what="the presigned URL expires", timeout=5, interval=0.2,
                                         check=lambda answer: answer[0] != 200)
    assert expired == 403
    assert "<Code>AccessDenied</Code>" in body and "Request has expired" in body


async def test_presigned_get_url_refuses_head(s3: S3Gateway, client: Any, prefix: str) -> None:
    """The method is part of what is signed: a URL presigned for GET does not serve HEAD
    (a HEAD needs its own head_object URL)."""
    key = f"{prefix}blob"
    await client.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
    params = {"Bucket": s3.bucket, "Key": key}
    get_url = await client.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    head_url = await client.generate_presigned_url("head_object", Params=params, ExpiresIn=60)

    async with aiohttp.ClientSession() as http:
        async with http.head(get_url) as refused:
            assert refused.status == 403
        async with http.head(head_url) as head:
            assert (head.status, head.headers["Content-Length"]) == (200, "1")


async def test_wrong_credentials_error_codes(s3: S3Gateway, prefix: str) -> None:
    key = f"{prefix}blob"
    async with s3.client(aws_secret_access_key="not-the-secret") as wrong_secret:
        with pytest.raises(ClientError) as get:
            await wrong_secret.get_object(Bucket=s3.bucket, Key=key)
        assert error(get) == ("SignatureDoesNotMatch", 403)
        with pytest.raises(ClientError) as head:
            await wrong_secret.head_object(Bucket=s3.bucket, Key=key)
        assert error(head) == ("403", 403)  # HEAD: no body, so only the status
    async with s3.client(aws_access_key_id="nobody") as unknown_key:
        with pytest.raises(ClientError) as put:
            await unknown_key.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
        assert error(put) == ("InvalidAccessKeyId", 403)


async def test_missing_bucket_error_codes(s3: S3Gateway, client: Any, prefix: str) -> None:
    key, bucket = f"{prefix}blob", "no-such-bucket"
    for call, kwargs in [(client.get_object, {"Key": key}), (client.put_object, {"Key": key, "Body": b"x"}),
                         (client.list_objects_v2, {}), (client.create_multipart_upload, {"Key": key})]:
        with pytest.raises(ClientError) as refused:
            await call(Bucket=bucket, **kwargs)
        assert error(refused) == ("NoSuchBucket", 404), call
    for call, kwargs in [(client.head_object, {"Key": key}), (client.head_bucket, {})]:
        with pytest.raises(ClientError) as refused:
            await call(Bucket=bucket, **kwargs)
        assert error(refused) == ("404", 404), call
    assert (await client.head_bucket(Bucket=s3.bucket))["ResponseMetadata"]["HTTPStatusCode"] == 200
