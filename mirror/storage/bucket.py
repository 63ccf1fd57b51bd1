"""An S3-compatible bucket: the content a fleet of mirrors shares (S3, MinIO, Ceph RGW, R2, GCS's S3 API).

Each replica keeps a local copy of what it serves in its data directory (the FileStore:
hits go out by sendfile) and publishes what it verified to the bucket, where every other
replica finds it instead of asking upstream.

Layout under the configured prefix:
- `content/sha256/<64 hex>`: verified bytes, blobs and manifests alike. An object appears
  only whole: a PUT or a completed multipart upload publishes it, and only content already
  verified and stored by the replica is uploaded. A failed upload is aborted; one a crash left
  behind (invisible: no object) is aborted by `sweep` once older than ABANDONED_AFTER.
- `used/sha256/<64 hex>`: empty markers whose LastModified says when a replica last used the
  content; eviction on the bucket (mirror.cache.bucketeviction) goes by them.

Control requests (HEAD, DELETE, LIST, multipart create/complete/abort) go through
aiobotocore. Bytes travel by presigned URLs over the mirror's own aiohttp session:
downloads are streamed like an upstream's into the same verifying pipeline, uploads skip
botocore's hashing of each payload on the event loop, and the same URLs are what
`redirect = true` hands to clients.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.config import S3Config
from mirror.metrics import Metrics
from mirror.reference import SHA256_RE

log = logging.getLogger("mirror.bucket")

PART_SIZE = 16 << 20  # bytes per part of a multipart upload (S3 wants 5 MiB to 5 GiB; at most 10 000 parts)
UPLOAD_CONCURRENCY = 2  # parts in flight at once: memory held is this many parts
PART_ATTEMPTS = 3
ABANDONED_AFTER = 24 * 3600.0  # an unfinished multipart upload older than this was left by a crash
URL_TTL = 3600  # seconds a presigned URL the mirror itself uses stays valid
DELETE_CONCURRENCY = 8


class BucketError(Exception):
    """A request to the bucket failed: what was asked, of which bucket, and what it answered
    (`status`: its HTTP status, None if it did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# What an upload sends: (offset, length) → the bytes of that range, in chunks, as they become available.
Chunks = Callable[[int, int], AsyncIterator[bytes]]


class NotInBucket(BucketError):
    """The object asked for is not there."""


class StoredObject(NamedTuple):
    """Content in the bucket: its digest, size in bytes, and when a replica last used it
    (epoch seconds: the later of the object's and its marker's LastModified)."""

    digest: str
    size: int
    used: float


class Bucket:
    """The bucket `config` names; `open` before use, `close` after."""

    def __init__(self, config: S3Config, metrics: Metrics) -> None:
        self.config = config
        self.name = config.bucket
        self.location = f"s3://{config.bucket}/{config.prefix}" + (f" at {config.endpoint_url}" if config.endpoint_url else "")
        self._metrics = metrics
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._exit = contextlib.AsyncExitStack()

    async def open(self) -> None:
        cfg = self.config
        aio = AioConfig(
            s3={"addressing_style": cfg.addressing_style},
            signature_version="s3v4",  # botocore would presign with V2, which newer stores refuse
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
            # checksums only where S3 requires them: many S3-compatible stores predate the trailing-checksum default
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        self._client = await self._exit.enter_async_context(_session().create_client(
            "s3", endpoint_url=cfg.endpoint_url or None, region_name=cfg.region, config=aio,
            aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key))
        timeout = aiohttp.ClientTimeout(sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        self._http = await self._exit.enter_async_context(
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False))

    async def close(self) -> None:
        await self._exit.aclose()

    def key(self, digest: str) -> str:
        if not SHA256_RE.fullmatch(digest):
            raise ValueError(f"refusing to build a key from unvalidated digest {digest!r}")
        return f"{self.config.prefix}content/sha256/{digest[7:]}"

    def _marker(self, digest: str) -> str:
        return f"{self.config.prefix}used/sha256/{self.key(digest).rsplit('/', 1)[1]}"

    # -- start-up ---------------------------------------------------------------
    async def check(self) -> None:
        """That the bucket exists, these keys may read it, and it accepts writes (a probe object
        is written and deleted). Raises BucketError saying which of these fails."""
        try:
            await self._call("head_bucket", Bucket=self.name)
        except BucketError as exc:
            hint = {404: "it does not exist (create it, or fix storage.s3.bucket)",
                    403: "access denied: check the keys and the bucket's policy",
                    400: "the request was refused: check storage.s3.region and addressing_style"}
            raise BucketError(f"cannot use bucket {self.location}: {hint.get(exc.status or 0, exc)}") from None
        probe = f"{self.config.prefix}probe/{secrets.token_hex(8)}"
        try:
            await self._call("put_object", Bucket=self.name, Key=probe, Body=b"")
            await self._call("delete_object", Bucket=self.name, Key=probe)
        except BucketError as exc:
            raise BucketError(f"bucket {self.location} refuses writes: {exc}") from None

    # -- reading ------------------------------------------------------------------
    async def size(self, digest: str) -> int | None:
        """Bytes of the content of `digest` in the bucket, None if it is not there; raises BucketError."""
        try:
            head = await self._call("head_object", Bucket=self.name, Key=self.key(digest))
        except NotInBucket:
            return None
        return int(head["ContentLength"])

    async def download(self, digest: str, start: int = 0) -> aiohttp.ClientResponse:
        """The content of `digest` from byte `start` on, as a streaming response (status 200 or
        206; the caller releases it). Raises BucketError (NotInBucket if it is not there)."""
        url = await self.url(digest, URL_TTL)
        headers = {"Range": f"bytes={start}-"} if start else {}
        began = time.monotonic()
        try:
            resp = await self._session.get(url, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._count("get", "error", began)
            raise BucketError(f"cannot get {digest} from {self.location}: {exc or 'timed out'}") from None
        if resp.status in (200, 206):
            self._count("get", "ok", began)
            return resp
        async with resp:
            self._count("get", "absent" if resp.status == 404 else "error", began)
            if resp.status == 404:
                raise NotInBucket(f"{digest} is not in {self.location}")
            raise BucketError(f"{self.location} answered GET of {digest} with {resp.status}: "
                              f"{_s3_error(await resp.text(errors='replace'))}")

    async def read(self, digest: str, max_bytes: int) -> bytes | None:
        """The whole content of `digest`, None if it is not there or larger than `max_bytes`; raises BucketError."""
        try:
            resp = await self.download(digest)
        except NotInBucket:
            return None
        async with resp:
            if resp.content_length is None or resp.content_length > max_bytes:
                return None
            try:
                return await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise BucketError(f"reading {digest} from {self.location} broke off: {exc or 'timed out'}") from None

    async def url(self, digest: str, ttl: float) -> str:
        """A presigned GET URL of the content of `digest`, valid for `ttl` seconds (computed here: no request)."""
        return await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": self.key(digest)}, ExpiresIn=int(ttl))

    # -- writing ------------------------------------------------------------------
    async def upload(self, digest: str, size: int, chunks: Chunks) -> None:
        """Publish the `size` bytes of `digest` that `chunks(offset, length)` yields (asked again for
        a range whose upload is retried): one PUT, or a multipart upload whose completion publishes
        it, aborted if anything fails. Raises BucketError; what `chunks` raises aborts the upload
        and propagates."""
        key = self.key(digest)
        if size < PART_SIZE:
            await self._put(self._presign("put_object", Key=key), size, lambda: chunks(0, size), "put")
            return
        upload_id = (await self._call("create_multipart_upload", Bucket=self.name, Key=key))["UploadId"]
        try:
            part_size = max(PART_SIZE, math.ceil(size / 10_000))
            etags: dict[int, str] = {}
            limit = asyncio.Semaphore(UPLOAD_CONCURRENCY)

            async def part(number: int) -> None:
                async with limit:
                    offset = (number - 1) * part_size
                    length = min(part_size, size - offset)
                    url = self._presign("upload_part", Key=key, UploadId=upload_id, PartNumber=number)
                    etags[number] = await self._put(url, length, lambda: chunks(offset, length), "upload_part")

            async with asyncio.TaskGroup() as group:
                for number in range(1, math.ceil(size / part_size) + 1):
                    group.create_task(part(number))
            await self._call("complete_multipart_upload", Bucket=self.name, Key=key, UploadId=upload_id,
                             MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]})
        except BaseException as exc:
            with contextlib.suppress(BucketError):
                await asyncio.shield(self._call("abort_multipart_upload", Bucket=self.name, Key=key, UploadId=upload_id))
            if isinstance(exc, BaseExceptionGroup):
                raise exc.exceptions[0] from None
            raise

    async def upload_bytes(self, digest: str, data: bytes) -> None:
        """Publish small verified content (a manifest) with one PUT; raises BucketError."""
        async def whole() -> AsyncIterator[bytes]:
            yield data
        await self._put(self._presign("put_object", Key=self.key(digest)), len(data), whole, "put")

    async def mark_used(self, digest: str) -> None:
        """Say that a replica uses the content of `digest` now (eviction spares what is in use); raises BucketError."""
        await self._call("put_object", Bucket=self.name, Key=self._marker(digest), Body=b"")

    async def delete(self, digests: Iterable[str]) -> None:
        """Remove content and its markers; absent ones are no error. Raises BucketError.

        One DELETE per key, DELETE_CONCURRENCY at a time: DeleteObjects needs a Content-MD5
        that current botocore no longer sends (it sends CRC32), and MinIO-based stores refuse it."""
        limit = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def delete(key: str) -> None:
            async with limit:
                await self._call("delete_object", Bucket=self.name, Key=key)

        try:
            async with asyncio.TaskGroup() as group:
                for digest in digests:
                    for key in (self.key(digest), self._marker(digest)):
                        group.create_task(delete(key))
        except BaseExceptionGroup as exc:
            raise exc.exceptions[0] from None

    # -- maintenance --------------------------------------------------------------
    async def objects(self) -> list[StoredObject]:
        """Every content object, with when it was last used. Raises BucketError."""
        sizes: dict[str, tuple[int, float]] = {}
        for key, size, modified in await self._list("content/sha256/"):
            digest = "sha256:" + key.rsplit("/", 1)[1]
            if SHA256_RE.fullmatch(digest):
                sizes[digest] = (size, modified)
        used = {"sha256:" + key.rsplit("/", 1)[1]: modified for key, _, modified in await self._list("used/sha256/")}
        return [StoredObject(d, size, max(modified, used.get(d, 0.0))) for d, (size, modified) in sizes.items()]

    async def used(self, digest: str) -> float | None:
        """When the content of `digest` was last used (as in `objects`), None if it is gone. Raises BucketError."""
        times = []
        for key in (self.key(digest), self._marker(digest)):
            try:
                times.append(_epoch((await self._call("head_object", Bucket=self.name, Key=key))["LastModified"]))
            except NotInBucket:
                if key == self.key(digest):
                    return None
        return max(times)

    async def sweep(self, now: float, older_than: float = ABANDONED_AFTER) -> int:
        """Abort multipart uploads under the prefix begun more than `older_than` seconds ago (a crash
        left them: a running one finishes far sooner); returns how many. Raises BucketError."""
        aborted = 0
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": self.config.prefix}
        while True:
            page = await self._call("list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads", []):
                if now - upload["Initiated"].timestamp() > older_than:
                    await self._call("abort_multipart_upload", Bucket=self.name, Key=upload["Key"],
                                     UploadId=upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    async def _list(self, under: str) -> list[tuple[str, int, float]]:
        found = []
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": self.config.prefix + under}
        while True:
            page = await self._call("list_objects_v2", **kwargs)
            found.extend((o["Key"], int(o["Size"]), _epoch(o["LastModified"])) for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    # -- requests -----------------------------------------------------------------
    @property
    def _session(self) -> aiohttp.ClientSession:
        assert self._http is not None, "Bucket.open was not called"
        return self._http

    def _presign(self, operation: str, **params: Any) -> Any:
        return self._client.generate_presigned_url(operation, Params={"Bucket": self.name, **params}, ExpiresIn=URL_TTL)

    async def _put(self, url_coro: Any, length: int, body: Callable[[], AsyncIterator[bytes]], op: str) -> str:
        """PUT the `length` bytes `body()` yields to a presigned URL, retrying network failures and
        5xx (with a fresh `body()`); returns the ETag. What `body()` raises propagates as it is
        (aiohttp would wrap it as a connection error)."""
        url = await url_coro
        for attempt in range(1, PART_ATTEMPTS + 1):
            began = time.monotonic()
            source = _Source(body())
            try:
                async with self._session.put(url, data=source.chunks(), headers={"Content-Length": str(length)}) as resp:
                    answer = await resp.text(errors="replace")
                    if resp.status == 200:
                        self._count(op, "ok", began)
                        return resp.headers.get("ETag", "")
                    problem = f"{resp.status}: {_s3_error(answer)}"
                    if resp.status < 500:
                        self._count(op, "error", began)
                        raise BucketError(f"{self.location} refused {op}: {problem}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if source.error is not None:
                    self._count(op, "aborted", began)
                    raise source.error from None
                problem = str(exc) or "timed out"
            self._count(op, "error", began)
            log.warning("%s to %s failed (attempt %d of %d): %s", op, self.location, attempt, PART_ATTEMPTS, problem)
        raise BucketError(f"{op} to {self.location} failed {PART_ATTEMPTS} times, last: {problem}")

    async def _call(self, operation: str, **params: Any) -> Any:
        """One aiobotocore request, counted and timed; raises BucketError (NotInBucket for a HEAD's 404)."""
        began = time.monotonic()
        try:
            answer = await getattr(self._client, operation)(**params)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            error = exc.response.get("Error", {})
            absent = status == 404 and operation == "head_object"
            self._count(operation, "absent" if absent else "error", began)
            message = f"{operation} on {self.location} refused ({status} {error.get('Code', '')}): {error.get('Message', '')}"
            raise (NotInBucket if absent else BucketError)(message.rstrip(": "), status) from None
        except (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._count(operation, "error", began)
            raise BucketError(f"{operation} on {self.location} failed: {exc or 'timed out'}") from None
        self._count(operation, "ok", began)
        return answer

    def _count(self, op: str, outcome: str, began: float) -> None:
        self._metrics.bucket_requests.labels(op, outcome).inc()
        self._metrics.bucket_request_duration.labels(op).observe(time.monotonic() - began)


READ_SIZE = 1 << 20  # bytes read from a file per chunk of an upload: memory per upload in flight


class _Source:
    """An upload's body, remembering what it raised."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


@functools.cache
def _session() -> AioSession:
    """One botocore session per process: it loads S3's service model once (a third of a second),
    not at every client made."""
    return get_session()


def _epoch(value: datetime) -> float:
    return value.timestamp()


def _s3_error(body: str) -> str:
    """`Code: Message` of an S3 XML error body (the body itself, shortened, if it is not one)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return body[:200] or "(no body)"
    code, message = root.findtext("Code") or "", root.findtext("Message") or ""
    return f"{code}: {message}".strip(": ") or body[:200]
