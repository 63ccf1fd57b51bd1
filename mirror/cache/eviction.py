"""Keeps the cache under its size cap: least-recently-used content goes first, pinned never.

Serving a manifest bumps the access time of every part of its image, so an
image's parts share one access time and leave together, whole. Stored content
and the temp files of running fetches count against the cap (the high mark):
crossing it, by a new row or by a fetch's write, wakes eviction at once, which
removes content down to the low mark, in batches, off the request path. A file
being sent when it is unlinked is still sent whole (POSIX), and content still
being fetched has no row yet, so nothing in flight is ever in the way. Tag TTLs
never delete anything.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path
from typing import AsyncIterator, Callable

from mirror.config import parse_size
from mirror.metrics import Metrics
from mirror.manifest import referenced_digests
from mirror.reference import is_digest
from mirror.storage.store import ContentStore
from mirror.storage.images import image_parts
from mirror.storage.metadata import Metadata

log = logging.getLogger("mirror.eviction")

LOW_MARK = 0.9
CHECK_EVERY = 2.0


def cap_bytes(max_size: str, data_dir: Path) -> int:
    """`cache.max_size` in bytes: as given, or that share of the data directory's file system."""
    size, fraction = parse_size(max_size)
    if size is not None:
        return size
    return int(shutil.disk_usage(data_dir).total * (fraction or 1.0))


async def pinned_digests(metadata: Metadata, store: ContentStore) -> set[str]:
    """Everything reachable from a pin; a pinned tag protects what it points at now."""
    pinned: set[str] = set()
    for upstream, repo, ref in await metadata.pins.all():
        digest = ref if is_digest(ref) else getattr(await metadata.tags.get(upstream, repo, ref), "digest", None)
        if digest:
            pinned |= (await image_parts(metadata, store, digest))[0]
    return pinned


class Evictor:
    """Evicts when the bytes in use (see `used`) pass the cap.

    Fetches call `written` after every batch they write and the metadata calls `stored`
    for every new row, so eviction keeps pace with writes; a timer catches the rest
    (a share of the disk that changed). Content is removed until the bytes in use are at
    the low mark, and a fetch commits inside `room`: its bytes land in room already made,
    so stored content stays within the cap and the data directory within the cap plus
    what the running fetches are writing. A burst of wakes runs one eviction and leaves
    at most one more pending.

    `cap` gives the cap in bytes (read anew at every pass); `in_flight` the bytes the
    running fetches have written to temp files so far.
    """

    def __init__(
        self, store: ContentStore, metadata: Metadata, metrics: Metrics, cap: Callable[[], int],
        on_evicted: Callable[[list[str]], None] = lambda _digests: None,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.metrics = metrics
        self.cap = cap
        self.on_evicted = on_evicted
        self.in_flight = in_flight
        self._due = asyncio.Event()  # a pass is wanted; set by wakes, cleared as a pass starts
        self._settled = asyncio.Event()  # no pass that bytes past the cap asked for is pending or running
        self._settled.set()
        self._force = False
        # the cap as the loop last read it (no statvfs per written batch); None while the loop
        # does not run, so nothing is woken and `room` never waits
        self._cap: int | None = None
        # after a pass found nothing more to remove: how far past the cap writes may go before
        # they ask for another pass (not one per batch); new rows, which can go, still ask at once
        self._slack = 0
        self._children: dict[str, list[str]] = {}  # manifest → what it references (bodies never change)
        self._reserved = 0  # bytes of the blob being committed, until its row counts them
        self._lock = asyncio.Lock()
        self._committing = asyncio.Lock()

    def used(self) -> int:
        """Bytes that count against the cap: stored content, the blob being committed (its room,
        held until its row is written), and temp files of running fetches up to the room between
        the low mark and the cap.

        Running fetches count only that far: counting all of them would, when a burst of misses
        outgrows the cap (a hanging upstream letting go), evict every cached image, the popular
        ones too, for fetches that may never land. Each fetch makes room for itself as it
        commits, so stored content stays within the cap and the data directory within the cap
        plus what the running fetches are writing."""
        cap = self._cap if self._cap is not None else self.cap()
        early = min(self.in_flight(), cap - int(cap * LOW_MARK))
        return self.metadata.content.size + max(self._reserved, early)

    def written(self) -> None:
        """A fetch wrote a batch: wake the loop if that took the bytes in use past the cap.
        Cheap and synchronous."""
        if self._cap is not None:
            self._ask(self._cap + self._slack)

    def stored(self) -> None:
        """A new row added to the stored bytes: wake the loop if they are past the cap."""
        if self._cap is not None:
            self._ask(self._cap)

    def _ask(self, high: int) -> None:
        if self.used() > high:
            self._settled.clear()
            self._due.set()

    def wake(self) -> None:
        """Evict now, down to the low mark (e.g. the disk filled up before the cap was reached)."""
        self._force = True
        self._due.set()

    @contextlib.asynccontextmanager
    async def room(self, size: int = 0) -> AsyncIterator[None]:
        """Around a fetch's commit and its row: room for `size` more bytes, made first if stored
        content plus them would pass the cap (at once when not, or when the loop does not run),
        and held until the row counts them. One commit at a time, so a crowd of fetches that
        finish together (a hanging upstream letting go) do not all land in the room of one pass."""
        async with self._committing:
            self._reserved = size
            try:
                if self._cap is not None:
                    self._ask(self._cap)
                while not self._settled.is_set():  # again if a write asked for another before this woke
                    await self._settled.wait()
                yield
            finally:
                self._reserved = 0

    async def run(self) -> None:
        """The background loop: a pass when woken, and a check every CHECK_EVERY seconds."""
        while True:
            force, self._force = self._force, False
            self._due.clear()  # wakes from here on leave one more pass pending, however many
            try:
                self._cap = self.cap()
                await self.evict(force)
            except Exception:
                log.exception("eviction failed; will try again")
            if not self._due.is_set():
                self._settled.set()
            # not wait_for: in 3.11 it returns the result when a cancel arrives as the event is
            # set, and this loop (woken on every write now) then outlives the app's shutdown
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_EVERY):
                    await self._due.wait()

    async def evict(self, force: bool = False) -> tuple[int, int]:
        """Remove LRU unpinned content down to the low mark (when above the cap, or `force`).

        Returns (objects removed, bytes freed)."""
        async with self._lock:
            return await self._evict(force)

    async def _evict(self, force: bool) -> tuple[int, int]:
        cap = self.cap()
        if self.used() <= cap and not force:
            self._slack = 0
            return 0, 0
        await self.metadata.flush()
        pinned = await pinned_digests(self.metadata, self.store)
        plan = await asyncio.to_thread(plan_images, await self.metadata.content.usage(), self.store, self._children)
        self._children = plan.children
        if self.used() <= cap and not force:
            self._slack = 0
            return 0, 0  # what asked was a blob counted twice for a moment, or a purge came first
        target = int(min(cap, self.used()) * LOW_MARK)
        units = iter(plan)
        removed = freed = 0
        # batches as large as the excess, each one transaction; fetches writing meanwhile add a batch
        while (excess := self.used() - target) > 0:
            batch: list[str] = []
            size = 0
            for unit in units:
                chosen = [d for d in unit.release() if d not in pinned]
                batch += chosen
                size += sum(plan.sizes[d] for d in chosen)
                if size >= excess:
                    break
            if not batch:
                break
            await self.remove(batch)
            removed += len(batch)
            freed += size
        if removed:
            log.info("evicted %d objects (%.1f MiB) to stay under the cap of %.1f MiB",
                     removed, freed / 2**20, cap / 2**20)
            self.metrics.evictions.inc(removed)
            self.metrics.evicted_bytes.inc(freed)
        if self.used() > target:
            log.warning("cache is %.1f MiB over its low mark with %.1f MiB being fetched: all that is left is pinned",
                        (self.used() - target) / 2**20, self.in_flight() / 2**20)
            # kept while passes stay stuck, so writes during one do not ask for the next
            self._slack = max(0, self.used() - cap) + cap - target
        else:
            self._slack = 0
        return removed, freed

    async def remove(self, digests: list[str]) -> None:
        """Drop content: rows first (nothing then points at a file about to go), then files."""
        if not digests:
            return
        await self.metadata.drop_content(digests)
        await asyncio.to_thread(lambda: [self.store.remove(d) for d in digests])
        self.on_evicted(digests)


class Unit:
    """One image (a top-level manifest or index with everything under it), or a lone blob."""

    def __init__(self, root: str, closure: set[str], last_access: float, refcount: dict[str, int]) -> None:
        self.root = root
        self.closure = closure
        self.last_access = last_access
        self._refcount = refcount

    def release(self) -> list[str]:
        """Give the unit up: its parts that no other remaining image uses may go."""
        gone = []
        for digest in self.closure:
            self._refcount[digest] -= 1
            if self._refcount[digest] == 0:
                gone.append(digest)
        return gone


class Plan(list[Unit]):
    """Units in eviction order (least recently used first), with every object's size (bytes) and
    what each stored manifest references (cached or not), for the next plan."""

    sizes: dict[str, int]
    children: dict[str, list[str]]


def plan_images(rows: list[tuple[str, int, str, float]], store: ContentStore,
                known: dict[str, list[str]] | None = None) -> Plan:
    """Group cached content into images and order them by when any of their manifests was last served.

    `rows` are `Metadata.content_usage()`; `known` is a previous plan's `children`: manifests
    found there are not read and parsed again (most of the cost with many objects). A part
    shared by several images (a base layer) goes only with the last of them.
    """
    known = known or {}
    kinds = {d: kind for d, _size, kind, _at in rows}
    access = {d: at for d, _size, _kind, at in rows}
    read: dict[str, list[str]] = {}
    for digest, kind in kinds.items():
        if kind == "manifest":
            if (refs := known.get(digest)) is None and (body := store.read(digest)) is not None:
                refs = referenced_digests(body)
            if refs is not None:
                read[digest] = refs
    children = {d: [c for c in refs if c in kinds] for d, refs in read.items()}
    referenced = {c for refs in children.values() for c in refs}
    refcount = dict.fromkeys(kinds, 0)
    plan = Plan()
    plan.sizes = {d: size for d, size, _kind, _at in rows}
    plan.children = read
    for root in (d for d in kinds if d not in referenced):
        closure, todo = set(), [root]
        while todo:
            current = todo.pop()
            if current not in closure:
                closure.add(current)
                todo.extend(children.get(current, ()))
        for digest in closure:
            refcount[digest] += 1
        recent = max(access[d] for d in closure if kinds[d] == "manifest" or d == root)
        plan.append(Unit(root, closure, recent, refcount))
    plan.sort(key=lambda unit: unit.last_access)
    return plan
