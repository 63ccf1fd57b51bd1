"""One upstream fetch per digest for the whole process; every reader follows the growing file.

The fetch is a task owned by the app, not by a request: a client that
disconnects does not cancel it, so the cache still fills. Readers (the first
and any that arrive later) read the temp file with `pread` as it grows and are
woken once per written chunk. Bytes reach the content path only after
`BlobWriter.commit` verified them; a mismatch fails every reader, whose
connection is then aborted so its client sees a truncated transfer.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable, TypeVar

import aiohttp

from mirror.metrics import Metrics
from mirror.storage.blobs import BlobWriter, ContentStore, DigestMismatch
from mirror.upstream.auth import Credentials
from mirror.upstream.client import Upstream, UpstreamError

log = logging.getLogger("mirror.inflight")

READ_CHUNK = 1 << 20
T = TypeVar("T")


class FetchFailed(Exception):
    """The shared fetch broke after headers were sent: the reader must abort its client."""


class Fetch:
    """State of one blob download, shared by its readers."""

    def __init__(self, digest: str, upstream: str, repo: str) -> None:
        self.digest = digest
        self.upstream = upstream
        self.repo = repo
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.started = asyncio.Event()
        self._progress = asyncio.Event()
        self._fd = -1
        self._readers = 0
        self._began = False

    def _begin(self, writer: BlobWriter, size: int | None) -> None:
        self._fd = os.open(writer.tmp_path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = size
        self._began = True
        self.started.set()

    def _advance(self, written: int) -> None:
        self.written = written
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done = True
        self.started.set()
        self._advance(self.written)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.done and self._readers == 0 and self._fd >= 0:
            os.close(self._fd)
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

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) as they are written; raises FetchFailed if the fetch fails.

        Call only between `join` and `leave`, after `wait_started`.
        """
        pos = start
        while end is None or pos < end:
            if self.error is not None:
                raise FetchFailed(str(self.error))
            available = self.written if self.done else self._unverified_limit()
            if pos < available:
                want = available - pos if end is None else min(available, end) - pos
                data = os.pread(self._fd, min(want, READ_CHUNK), pos)
                pos += len(data)
                yield data
            elif self.done:
                break
            else:
                await self._progress.wait()

    def _unverified_limit(self) -> int:
        """Until verified, the last byte is held back, so a bad blob always reaches clients truncated."""
        return self.written if self.size is None else min(self.written, self.size - 1)

OnStored = Callable[[Fetch], Awaitable[None]]


class Inflight:
    """The process-wide table of running fetches, keyed by digest."""

    def __init__(self, store: ContentStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._fetches: dict[str, Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def join(self, digest: str) -> Fetch | None:
        """The running fetch of `digest`, with the caller registered as a reader."""
        fetch = self._fetches.get(digest)
        return fetch.join() if fetch else None

    def start(
        self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None, on_stored: OnStored
    ) -> Fetch:
        """Start the fetch for `digest` as `creds` (the caller checked none is running) and join it."""
        fetch = Fetch(digest, upstream.name, repo).join()
        self._fetches[digest] = fetch
        task = asyncio.get_running_loop().create_task(self._run(fetch, upstream, creds, on_stored))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch

    async def close(self) -> None:
        """Cancel running fetches at shutdown; their temp files are removed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, fetch: Fetch, upstream: Upstream, creds: Credentials | None, on_stored: OnStored) -> None:
        self._metrics.inflight_fetches.inc()
        error: BaseException | None = None
        writer: BlobWriter | None = None
        try:
            resp = await upstream.open_blob(fetch.repo, fetch.digest, creds)
            async with resp:
                writer = self._store.writer(fetch.digest, resp.content_length)
                fetch._begin(writer, resp.content_length)
                while chunk := await resp.content.read(READ_CHUNK):
                    await asyncio.to_thread(writer.write, chunk)
                    fetch._advance(writer.written)
                self._metrics.upstream_bytes.labels(upstream.name).inc(writer.written)
            await asyncio.to_thread(writer.commit)
            await on_stored(fetch)
        except DigestMismatch as exc:
            error = exc
            self._metrics.digest_mismatches.labels(upstream.name).inc()
            log.error("discarded blob from upstream %s, repository %s: %s", upstream.name, fetch.repo, exc)
        except UpstreamError as exc:
            error = exc
            if fetch.started.is_set():
                log.error("fetch of %s from %s failed: %s", fetch.digest, upstream.name, exc)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = UpstreamError(upstream.name, None, f"blob {fetch.digest} broke off after {fetch.written} bytes: {exc or 'read timed out'}")
            log.error("%s", error)
        except asyncio.CancelledError:
            error = FetchFailed("mirror shutting down")
            raise
        except Exception as exc:
            error = exc
            log.exception("fetch of %s failed", fetch.digest)
        finally:
            if writer is not None:
                writer.close()
            del self._fetches[fetch.digest]
            fetch._finish(error)
            self._metrics.inflight_fetches.dec()


class SingleFlight:
    """Run one coroutine per key at a time; concurrent callers share its result.

    The shared work is shielded: a caller that goes away does not cancel it.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def do(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        fut = self._running.get(key)
        if fut is None:
            fut = asyncio.ensure_future(work())
            self._running[key] = fut
            fut.add_done_callback(lambda _f: self._running.pop(key, None))
        return await asyncio.shield(fut)
