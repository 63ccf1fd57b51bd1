"""The fleet's shared tier as the services use it: content another replica stored, and publishing
what this one verified (see mirror.storage.bucket for the bucket itself).

A replica reads the bucket only for content it lacks locally, and copies it into its own store
through the same verifying path as an upstream fetch, so nothing in the bucket is served unverified
and the bytes it serves next go out by sendfile. What it fetched from upstream, verified and
stored, it uploads. Content the replica uses is marked as used in the bucket (at most every MARK_INTERVAL
per digest), so eviction on the bucket spares it.

A bucket that fails is never silently replaced by the local disk: a request that would have to ask
it gets 503 UNAVAILABLE naming the bucket, and the failure is counted (`mirror_bucket_requests`).
Only publishing, after a client has its bytes, fails quietly: logged and counted, the content stays
cached here, and the next replica that needs it fetches it once more.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, AsyncIterator, BinaryIO, Callable, Coroutine

import aiohttp
from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.manifest import MANIFEST_MAX_BYTES
from mirror.metrics import Metrics
from mirror.storage.bucket import READ_SIZE, Bucket, BucketError, Chunks
from mirror.storage.store import ContentStore

log = logging.getLogger("mirror.shared")

MARK_INTERVAL = 600.0  # seconds between use markers of one digest (bucket eviction's grace is several times it)


class SharedContent:
    """`bucket` beside the local `store`; `redirect` sends clients presigned URLs valid for `redirect_ttl` s."""

    def __init__(self, bucket: Bucket, store: ContentStore, metrics: Metrics, redirect: bool = False,
                 redirect_ttl: float = 1200.0, clock: Callable[[], float] = time.time) -> None:
        self.bucket = bucket
        self.store = store
        self.redirect = redirect
        self.redirect_ttl = redirect_ttl
        self._metrics = metrics
        self._clock = clock
        self._marked: LRUCache[str, float] = LRUCache(100_000)  # digest → when its use marker was last written
        self._tasks: set[asyncio.Task[Any]] = set()

    async def size(self, digest: str) -> int | None:
        """Bytes of `digest` in the bucket, None if it is not there; RegistryError 503 if the bucket
        fails or does not answer within one request's timeouts (its client's retries included)."""
        async with self._answer_soon("head_object"):
            return await self.bucket.size(digest)

    async def download(self, digest: str) -> aiohttp.ClientResponse:
        """The content of `digest`, streaming (for `Inflight.fill`); raises BucketError (NotInBucket)."""
        return await self.bucket.download(digest)

    async def url(self, digest: str) -> str:
        """A presigned URL of `digest` for a client (`redirect`), marking it used."""
        self.used(digest)
        return await self.bucket.url(digest, self.redirect_ttl)

    async def manifest(self, digest: str) -> bytes | None:
        """The body stored at `digest` (unverified: the caller checks it), None if absent or too large
        for a manifest (a layer); RegistryError 503."""
        async with self._answer_soon("get"):
            return await self.bucket.read(digest, MANIFEST_MAX_BYTES)

    @contextlib.asynccontextmanager
    async def _answer_soon(self, op: str) -> AsyncIterator[None]:
        """A request waits for the bucket (`op`, retries included) as long as for one attempt:
        RegistryError 503 after that (counted as a timeout of `op`), or when it fails."""
        limit = self.bucket.config.connect_timeout + self.bucket.config.read_timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            self._metrics.bucket_requests.labels(op, "timeout").inc()
            raise _unavailable(BucketError(f"{self.bucket.location} did not answer within {limit:g}s")) from None
        except BucketError as exc:
            raise _unavailable(exc) from None

    def used(self, digest: str) -> None:
        """Mark `digest` as in use, in the background, unless it was marked within MARK_INTERVAL."""
        now = self._clock()
        if now - self._marked.get(digest, float("-inf")) < MARK_INTERVAL:
            return
        self._marked[digest] = now
        self._background(self.bucket.mark_used(digest), f"marking {digest} as used")

    async def publish(self, digest: str, size: int) -> None:
        """Upload a blob fetched from upstream, verified and stored here, of `size` bytes (for
        `Inflight`). Failures are logged: the blob is cached here whatever becomes of its upload."""
        file = self.store.open(digest)
        if file is None:
            return  # evicted already: nothing to share
        self._metrics.bucket_uploads.inc()
        try:
            with file:
                await self.bucket.upload(digest, size, _file_chunks(file))
        except BucketError as exc:
            log.error("%s is cached here but not shared with the fleet: %s", digest, exc)
            return
        finally:
            self._metrics.bucket_uploads.dec()
        self._marked[digest] = self._clock()
        self._metrics.bucket_bytes.labels("up").inc(size)

    def publish_manifest(self, digest: str, body: bytes) -> None:
        """Upload a verified manifest in the background; failures are logged."""
        async def upload() -> None:
            await self.bucket.upload_bytes(digest, body)
            self._marked[digest] = self._clock()
            self._metrics.bucket_bytes.labels("up").inc(len(body))
        self._background(upload(), f"sharing manifest {digest}")

    async def discard(self, digest: str) -> None:
        """Delete an object whose bytes do not match its digest, and count it."""
        self._metrics.bucket_discarded.inc()
        try:
            await self.bucket.delete([digest])
        except BucketError as exc:
            log.error("could not delete %s, which does not match its digest: %s", digest, exc)

    async def idle(self) -> None:
        """Wait for background uploads and markers (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.idle()

    def _background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except BucketError as exc:
                log.warning("%s failed: %s", what, exc)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _file_chunks(file: BinaryIO) -> Chunks:
    """A stored file's bytes a chunk at a time, read in a thread (a layer is never all in memory)."""
    async def chunks(offset: int, length: int) -> AsyncIterator[bytes]:
        position, end = offset, offset + length
        while position < end:
            chunk = await asyncio.to_thread(os.pread, file.fileno(), min(READ_SIZE, end - position), position)
            if not chunk:
                raise BucketError(f"the file to upload ended {end - position} bytes early")
            position += len(chunk)
            yield chunk
    return chunks


def _unavailable(exc: BucketError) -> RegistryError:
    return RegistryError("UNAVAILABLE", 503, f"the shared content store is failing: {exc}")
