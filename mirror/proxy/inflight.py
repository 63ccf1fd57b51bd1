"""One fetch per digest for the whole process; every reader follows the growing file.

A fetch reads from upstream or, in a fleet, copies what another replica stored from the shared
bucket (`fill`): the same verified path either way.

The fetch is a task owned by the app, not by a request: a client that
disconnects does not cancel it, so the cache still fills. Readers (the first
and any that arrive later) read the temp file with `pread` as it grows and are
woken once per written chunk. Bytes reach the content path only after
`BlobWriter.commit` verified them; a mismatch fails every reader, whose
connection is then aborted so its client sees a truncated transfer.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable, Coroutine, NamedTuple

import aiohttp

from mirror.errors import NeedsPrimary
from mirror.metrics import Metrics
from mirror.storage.bucket import BucketError, NotInBucket
from mirror.storage.store import BlobWriter, ContentStore, DigestMismatch
from mirror.upstream.client import Upstream
from mirror.upstream.credentials import Credentials
from mirror.upstream.errors import UpstreamError

log = logging.getLogger("mirror.inflight")

WRITE_BATCH = 1 << 20
RECV_SIZE = 1 << 20
PIPELINE_DEPTH = 4  # chunks read ahead of hashing
RELAY_LIMIT = 16 << 20  # memory a pass-through fetch may hold for its slowest reader


class Span(NamedTuple):
    """`count` bytes at `offset`: in the temp file (`data` None), or held in memory."""

    offset: int
    count: int
    data: bytes | None


class FetchFailed(Exception):
    """The shared fetch broke after headers were sent: the reader must abort its client."""


class SourceGone(FetchFailed):
    """The shared tier no longer held the content when its copy began (evicted meanwhile)."""


class Fetch:
    """State of one blob download, shared by its readers."""

    def __init__(self, digest: str, upstream: str, repo: str) -> None:
        self.digest = digest
        self.upstream = upstream
        self.repo = repo
        self.size: int | None = None
        self.tmp_name = ""
        self.written = 0
        self.done = False
        self.verified = False  # every byte hashed to the digest: all of it may go out
        self.error: BaseException | None = None
        self.started = asyncio.Event()
        self._progress = asyncio.Event()
        self._file: BinaryIO | None = None
        self._fd = -1
        self._readers = 0
        self._began = False
        # after the disk filled up: bytes past `_on_disk` are relayed from memory (offset, bytes)
        self._on_disk: int | None = None
        self._tail: list[tuple[int, bytes]] = []
        self._positions: dict[object, int] = {}
        self._consumed = asyncio.Event()

    def _begin(self, writer: BlobWriter, size: int | None) -> None:
        self._file = writer.open_written()
        self._fd = self._file.fileno()
        self.tmp_name = writer.temp_name
        self.size = size
        self._began = True
        self.started.set()

    def _advance(self, written: int) -> None:
        self.written = written
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _verified(self) -> None:
        self.verified = True
        self._advance(self.written)

    def _finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done = True
        self.started.set()
        self._advance(self.written)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.done and self._readers == 0 and self._file is not None:
            self._file.close()
            self._file = None
            self._fd = -1

    def join(self) -> Fetch:
        """Register a reader: the file stays readable until it calls `leave`."""
        self._readers += 1
        return self

    def leave(self) -> None:
        self._readers -= 1
        self._maybe_close()

    async def wait_started(self) -> None:
        """Wait until upstream answered; raises its error if it refused before sending a byte."""
        await self.started.wait()
        if not self._began and self.error is not None:
            raise self.error

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncIterator[Span]:
        """Yield [start, end) as spans of the temp file (or of memory, past a full disk) as the
        bytes arrive; raises FetchFailed if the fetch fails.

        Call only between `join` and `leave`, after `wait_started`. A span is consumed when the
        next one is asked for.
        """
        pos = start
        me = object()
        self._positions[me] = pos
        try:
            while end is None or pos < end:
                if self.error is not None:
                    raise FetchFailed(str(self.error))
                available = self.written if self.done or self.verified else self._unverified_limit(end)
                if pos < available:
                    span = self._span_at(pos, available if end is None else min(available, end))
                    yield span
                    pos += span.count
                    self._positions[me] = pos
                    self._consumed.set()
                elif self.done:
                    break
                else:
                    await self._progress.wait()
        finally:
            del self._positions[me]
            self._consumed.set()

    def _span_at(self, pos: int, limit: int) -> Span:
        """What lies at `pos` (up to `limit`): a stretch of the temp file, or bytes past a full disk."""
        if self._on_disk is None or pos < self._on_disk:
            stop = limit if self._on_disk is None else min(limit, self._on_disk)
            return Span(pos, stop - pos, None)
        for offset, chunk in self._tail:
            if offset <= pos < offset + len(chunk):
                data = chunk[pos - offset:limit - offset]
                return Span(pos, len(data), data)
        raise FetchFailed(f"bytes at {pos} of {self.digest} are no longer held")

    def pread(self, span: Span) -> bytes:
        """The bytes of a span (for senders that cannot use sendfile)."""
        return span.data if span.data is not None else os.pread(self._fd, span.count, span.offset)

    def open_file(self) -> BinaryIO:
        """A file object on the temp file for `loop.sendfile` (its own descriptor)."""
        return os.fdopen(os.dup(self._fd), "rb")

    async def _relay(self, chunk: bytes, offset: int) -> None:
        """Keep a chunk the disk could not take for the readers; wait while they lag too far."""
        self._tail.append((offset, chunk))
        while True:
            slowest = min(self._positions.values(), default=None)
            if slowest is None:
                raise FetchFailed("the disk is full and no reader is left to pass the blob through to")
            self._tail = [(o, c) for o, c in self._tail if o + len(c) > slowest]
            if sum(len(c) for _, c in self._tail) <= RELAY_LIMIT:
                return
            self._consumed.clear()
            await self._consumed.wait()

    def _unverified_limit(self, end: int | None) -> int:
        """Until verified, the last byte of what a reader asked for is held back, so a bad blob
        always reaches clients truncated: the blob's last byte, or a range's own last byte (a
        range of a blob still arriving is not released before the whole blob hashed right)."""
        limit = self.written if self.size is None else min(self.written, self.size - 1)
        return limit if end is None else min(limit, end - 1)

OnStored = Callable[[Fetch], Awaitable[None]]
SizeOf = Callable[[], Awaitable[int | None]]
Download = Callable[[], Awaitable[aiohttp.ClientResponse]]
Publish = Callable[[str, int], Awaitable[None]]


class Source(NamedTuple):
    """Where a fetch reads from: upstream `name`, or the shared tier (`shared`, named "bucket")."""

    name: str
    open: Download
    size_of: SizeOf | None
    shared: bool
    on_mismatch: Callable[[], Awaitable[None]] | None = None


class Inflight:
    """The process-wide table of running fetches, keyed by digest."""

    def __init__(
        self, store: ContentStore, metrics: Metrics, on_disk_full: Callable[[], None] = lambda: None,
        local_only: bool = False, on_written: Callable[[], None] = lambda: None,
        room: Callable[[int], AbstractAsyncContextManager[None]] | None = None, publish: Publish | None = None,
    ) -> None:
        """`on_written` is called after every batch written to a temp file (cheap, synchronous);
        `room(size)` is entered before a verified blob is moved into the store and left once its
        row is written: it makes room for `size` bytes and holds it until they count as stored.
        `publish(digest, size)` is started in the background for every blob fetched from upstream
        once it is stored (a fleet's bucket uploads it); it logs its own failures: the blob is
        cached here whatever becomes of its upload."""
        self._store = store
        self._local_only = local_only  # in a secondary worker: fetches happen in the primary
        self._metrics = metrics
        self._on_disk_full = on_disk_full
        self._on_written = on_written
        self._room = room or (lambda _size: contextlib.nullcontext())
        self._publish = publish
        self._fetches: dict[str, Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def local_only(self) -> bool:
        """In a secondary worker: fetches happen in the primary."""
        return self._local_only

    def temp_files(self) -> set[str]:
        """Names of the temp files running fetches are writing (garbage collection keeps them)."""
        return {f.tmp_name for f in self._fetches.values() if f.tmp_name}

    def bytes_in_flight(self) -> int:
        """Bytes running fetches have written to temp files (counted against the size cap)."""
        return sum(f.written for f in self._fetches.values())

    def join(self, digest: str) -> Fetch | None:
        """The running fetch of `digest`, with the caller registered as a reader."""
        fetch = self._fetches.get(digest)
        return fetch.join() if fetch else None

    def start(
        self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None, on_stored: OnStored,
        size_of: SizeOf | None = None,
    ) -> Fetch:
        """Start the fetch for `digest` from upstream as `creds` (the caller checked none is running)
        and join it.

        `size_of` is asked for the blob's size if upstream sends it without Content-Length:
        readers then still get a length, and the bytes are checked against it. With a shared
        tier, the blob is uploaded to it once stored (see `publish`).
        """
        return self._start(digest, upstream.name, repo, Source(
            upstream.name, lambda: upstream.open_blob(repo, digest, creds), size_of, shared=False), on_stored)

    def fill(self, digest: str, upstream: str, repo: str, download: Download, on_stored: OnStored,
             on_mismatch: Callable[[], Awaitable[None]]) -> Fetch:
        """Start copying `digest` from the shared tier (`download()` opens it) and join it: the same
        verified path as a fetch from upstream, for content another replica stored. `on_mismatch`
        is awaited if its bytes do not match their digest."""
        return self._start(digest, upstream, repo, Source("bucket", download, None, shared=True,
                                                            on_mismatch=on_mismatch), on_stored)

    def _start(self, digest: str, upstream: str, repo: str, source: Source, on_stored: OnStored) -> Fetch:
        if self._local_only:
            raise NeedsPrimary()
        fetch = Fetch(digest, upstream, repo).join()
        self._fetches[digest] = fetch
        self._background(self._run(fetch, source, on_stored))
        return fetch

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task of this table: `idle` waits for it, `close` cancels it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, fetch: Fetch, writer: BlobWriter, content: aiohttp.StreamReader) -> None:
        """Upstream bytes to the temp file (and so to the readers) and to the digest check.

        Three stages joined by short queues: reading from the socket, writing (a worker
        thread) and hashing (another), so they overlap instead of taking turns.
        """
        to_disk: asyncio.Queue[list[bytes] | None] = asyncio.Queue(PIPELINE_DEPTH)
        to_hash: asyncio.Queue[list[bytes] | None] = asyncio.Queue(PIPELINE_DEPTH)

        async def read_all() -> None:
            taken = 0
            while batch := await _next_batch(content, taken):
                taken += sum(map(len, batch))
                await to_disk.put(batch)
                await to_hash.put(batch)
            await to_disk.put(None)
            await to_hash.put(None)

        async def store_all() -> None:
            offset = 0
            while (batch := await to_disk.get()) is not None:
                await self._keep(fetch, writer, batch, offset)
                offset += sum(map(len, batch))
                fetch._advance(offset)
                self._on_written()

        async def hash_all() -> None:
            while (batch := await to_hash.get()) is not None:
                await asyncio.to_thread(writer.hash, batch)

        stages = [asyncio.ensure_future(stage()) for stage in (read_all, store_all, hash_all)]
        try:
            await asyncio.gather(*stages)
        finally:
            for stage in stages:
                stage.cancel()
            await asyncio.gather(*stages, return_exceptions=True)

    async def _keep(self, fetch: Fetch, writer: BlobWriter, batch: list[bytes], offset: int) -> None:
        """Write a batch to disk; past a full disk, hold it in memory for the readers instead."""
        if fetch._on_disk is None:
            try:
                await asyncio.to_thread(writer.append, batch)
                return
            except OSError as exc:
                self._disk_failed(fetch, writer, exc)
        start = max(fetch._on_disk or 0, offset)
        await fetch._relay(b"".join(batch)[start - offset:], start)

    def _disk_failed(self, fetch: Fetch, writer: BlobWriter, exc: OSError) -> None:
        """The disk refused a write: pass the rest through to the readers, store nothing."""
        fetch._on_disk = writer.on_disk
        self._fetches.pop(fetch.digest, None)  # newcomers start afresh rather than join a relay
        self._metrics.store_failures.labels(errno.errorcode.get(exc.errno or 0, "EIO")).inc()
        log.error("cannot store %s (%s); passing it through uncached and evicting early", fetch.digest, exc.strerror)
        self._on_disk_full()

    async def idle(self) -> None:
        """Wait until every running fetch has finished storing (for tests and maintenance)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel running fetches at shutdown; their temp files are removed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, fetch: Fetch, source: Source, on_stored: OnStored) -> None:
        self._metrics.inflight_fetches.inc()
        error: BaseException | None = None
        writer: BlobWriter | None = None
        try:
            resp = await source.open()
            _read_in_large_pieces(resp)
            async with resp:
                size = resp.content_length
                if size is None and source.size_of is not None:
                    size = await source.size_of()
                writer = self._store.writer(fetch.digest, size)  # its commit checks the size too
                fetch._begin(writer, size)
                await self._pump(fetch, writer, resp.content)
                if source.shared:
                    self._metrics.bucket_bytes.labels("down").inc(writer.written)
                else:
                    self._metrics.upstream_bytes.labels(source.name).inc(writer.written)
            writer.verify()
            fetch._verified()  # readers may have the last byte now; storing it can follow
            if fetch._on_disk is None:
                async with self._room(writer.written):
                    await asyncio.to_thread(writer.commit)
                    await on_stored(fetch)
                if self._publish is not None and not source.shared:
                    # after the commit, not beside the download: on the same CPUs an upload
                    # racing the fetch doubled a cold client's time (bench/RESULTS.md)
                    self._background(self._publish(fetch.digest, writer.written))
        except DigestMismatch as exc:
            error = exc
            if source.on_mismatch is not None:
                log.error("discarded %s from the shared bucket: %s", fetch.digest, exc)
                await source.on_mismatch()
            else:
                self._metrics.digest_mismatches.labels(source.name).inc()
                log.error("discarded blob from upstream %s, repository %s: %s", source.name, fetch.repo, exc)
        except UpstreamError as exc:
            error = exc
            if fetch.started.is_set():
                log.error("fetch of %s from %s failed: %s", fetch.digest, source.name, exc)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            problem = f"blob {fetch.digest} broke off after {fetch.written} bytes: {exc or 'read timed out'}"
            error = FetchFailed(f"the shared bucket's {problem}") if source.shared else UpstreamError(source.name, None, problem)
            log.error("%s", error)
        except NotInBucket as exc:
            error = SourceGone(str(exc))
        except (FetchFailed, BucketError) as exc:
            error = exc if isinstance(exc, FetchFailed) else FetchFailed(str(exc))
            log.warning("fetch of %s stopped: %s", fetch.digest, exc)
        except asyncio.CancelledError:
            error = FetchFailed("mirror shutting down")
            raise
        except Exception as exc:
            error = exc
            log.exception("fetch of %s failed", fetch.digest)
        finally:
            if writer is not None:
                writer.close()
            if self._fetches.get(fetch.digest) is fetch:
                del self._fetches[fetch.digest]
            fetch._finish(error)
            self._metrics.inflight_fetches.dec()


def _read_in_large_pieces(resp: aiohttp.ClientResponse) -> None:
    """Let the socket hand over up to 1 MiB per read instead of asyncio's 256 KiB: fewer
    wake-ups per blob (cold 512 MiB blob: about 7% faster). Transports without the
    attribute (TLS) are unaffected."""
    transport = resp.connection.transport if resp.connection is not None else None
    if transport is not None and hasattr(transport, "max_size"):
        transport.max_size = RECV_SIZE  # type: ignore[attr-defined]


async def _next_batch(content: aiohttp.StreamReader, taken: int) -> list[bytes]:
    """What upstream has sent, in the pieces it arrived in, gathered up to WRITE_BATCH.

    Pieces are never joined: writev and the hash take them as they are, so a
    byte is copied once on its way from the socket to the disk. Empty at the end.
    """
    batch: list[bytes] = []
    size = 0
    while size < WRITE_BATCH and (not batch or content.total_bytes > taken + size):  # waits for the first only
        data, end_of_http_chunk = await content.readchunk()
        if data:
            batch.append(data)
            size += len(data)
        elif not end_of_http_chunk:
            break  # the end of the body
    return batch
