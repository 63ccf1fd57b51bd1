"""Keeps the cache under its size cap: least-recently-used content goes first, pinned never.

Serving a manifest bumps the access time of every part of its image, so an
image's parts share one access time and leave together, whole. Above the high
mark (the cap) content is removed down to the low mark, in batches, off the
request path. A file being sent when it is unlinked is still sent whole
(POSIX), and content still being fetched has no row yet, so nothing in flight
is ever in the way. Tag TTLs never delete anything.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Callable

from mirror.config import parse_size
from mirror.metrics import Metrics
from mirror.manifest import referenced_digests
from mirror.reference import is_digest
from mirror.storage.blobs import ContentStore
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
    for upstream, repo, ref in await metadata.pins():
        digest = ref if is_digest(ref) else getattr(await metadata.get_tag(upstream, repo, ref), "digest", None)
        if digest:
            pinned |= (await image_parts(metadata, store, digest))[0]
    return pinned


class Evictor:
    def __init__(
        self, store: ContentStore, metadata: Metadata, metrics: Metrics, cap: Callable[[], int],
        on_evicted: Callable[[list[str]], None] = lambda _digests: None,
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.metrics = metrics
        self.cap = cap
        self.on_evicted = on_evicted
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        """Evict now, down to the low mark (e.g. the disk filled up before the cap was reached)."""
        self._wake.set()

    async def run(self) -> None:
        """The background loop: a cheap in-memory size check every few seconds, eviction when needed."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), CHECK_EVERY)
            except asyncio.TimeoutError:
                pass
            force, self._wake = self._wake.is_set(), asyncio.Event()
            if force or self.metadata.size > self.cap():
                try:
                    await self.evict(force)
                except Exception:
                    log.exception("eviction failed; will try again")

    async def evict(self, force: bool = False) -> tuple[int, int]:
        """Remove LRU unpinned content down to the low mark (when above the cap, or `force`)."""
        async with self._lock:
            return await self._evict(force)

    async def _evict(self, force: bool) -> tuple[int, int]:
        cap = self.cap()
        if self.metadata.size <= cap and not force:
            return 0, 0
        target = int(min(cap, self.metadata.size) * LOW_MARK)
        await self.metadata.flush()
        pinned = await pinned_digests(self.metadata, self.store)
        plan = await asyncio.to_thread(plan_images, await self.metadata.content_usage(), self.store)
        removed = freed = 0
        for unit in plan:
            if self.metadata.size <= target:
                break
            chosen = [d for d in unit.release() if d not in pinned]
            sizes = {d: plan.sizes[d] for d in chosen}
            await self.remove(chosen)
            removed += len(chosen)
            freed += sum(sizes.values())
        if removed:
            log.info("evicted %d objects (%.1f MiB) to stay under the cap of %.1f MiB",
                     removed, freed / 2**20, cap / 2**20)
            self.metrics.evictions.inc(removed)
            self.metrics.evicted_bytes.inc(freed)
        if self.metadata.size > target:
            log.warning("cache is %.1f MiB over its low mark and all that is left is pinned",
                        (self.metadata.size - target) / 2**20)
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
    """Units in eviction order (least recently used first), with every object's size."""

    sizes: dict[str, int]


def plan_images(rows: list[tuple[str, int, str, float]], store: ContentStore) -> Plan:
    """Group cached content into images and order them by when any of their manifests was last served.

    A part shared by several images (a base layer) goes only with the last of them.
    """
    kinds = {d: kind for d, _size, kind, _at in rows}
    access = {d: at for d, _size, _kind, at in rows}
    children: dict[str, list[str]] = {}
    for digest, kind in kinds.items():
        if kind == "manifest" and (body := store.read(digest)) is not None:
            children[digest] = [c for c in referenced_digests(body) if c in kinds]
    referenced = {c for refs in children.values() for c in refs}
    refcount = dict.fromkeys(kinds, 0)
    plan = Plan()
    plan.sizes = {d: size for d, size, _kind, _at in rows}
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
