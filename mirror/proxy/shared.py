"""The fleet's shared tier as the services use it: content another replica stored, and publishing
what this one verified (see mirror.storage.bucket for the bucket itself).

A replica reads the bucket only for content it lacks locally, and copies it into its own store
through the same verifying path as an upstream fetch, so nothing in the bucket is served unverified
and the bytes it serves next go out by sendfile. What it fetches from upstream it uploads as the
bytes arrive, and publishes once they are verified. Content the replica uses is marked as used in the bucket (at most every MARK_INTERVAL
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
from typing import Any, AsyncIterator, Callable, Coroutine

import aiohttp
from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.manifest import MANIFEST_MAX_BYTES
from mirror.metrics import Metrics
from mirror.proxy.inflight import Fetch, FetchFailed
from mirror.storage.bucket import READ_SIZE, Bucket, BucketError
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

    async def share(self, fetch: Fetch) -> None:
        """Upload a blob being fetched from upstream as its bytes arrive (for `Inflight`, which
        joined `fetch` for this; left here). The upload completes, publishing the blob, only once
        every byte hashed to its digest; a fetch that fails aborts it. Failures are logged: the
        blob is cached here whatever becomes of its upload."""
        self._metrics.bucket_uploads.inc()
        try:
            size = fetch.size
            if size is None:  # upstream sent no length: the parts can be cut only at the end
                async with contextlib.aclosing(fetch.spans()) as spans:
                    async for _ in spans:
                        pass
                size = fetch.written
            await self.bucket.upload(fetch.digest, size, lambda offset, length: _arriving(fetch, offset, length))
        except BucketError as exc:
            log.error("%s is cached here but not shared with the fleet: %s", fetch.digest, exc)
            return
        except FetchFailed:
            return  # nothing verified to share; the upload was aborted
        finally:
            fetch.leave()
            self._metrics.bucket_uploads.dec()
        self._marked[fetch.digest] = self._clock()
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


async def _arriving(fetch: Fetch, offset: int, length: int) -> AsyncIterator[bytes]:
    """[offset, offset + length) of a fetch in chunks as its bytes arrive; raises FetchFailed if it
    fails. The blob's last byte comes only once the whole blob hashed to its digest: the part that
    ends with it is the last to complete, so the upload completes only with verified bytes."""
    last = offset + length == fetch.size
    with fetch.open_file() as file:
        async with contextlib.aclosing(fetch.spans(offset, offset + length, hold=last)) as spans:
            async for span in spans:
                if span.data is not None:  # past a full disk: held in memory
                    yield span.data
                    continue
                position, end = span.offset, span.offset + span.count
                while position < end:
                    chunk = await asyncio.to_thread(os.pread, file.fileno(), min(READ_SIZE, end - position), position)
                    position += len(chunk)
                    yield chunk


def _unavailable(exc: BucketError) -> RegistryError:
    return RegistryError("UNAVAILABLE", 503, f"the shared content store is failing: {exc}")
