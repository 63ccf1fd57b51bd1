"""Keeps a fleet's bucket under `[storage.s3] max_size`: what no replica used for longest goes first.

Each replica evicts only its own local copies (mirror.cache.eviction); the bucket is shared, so
its eviction goes by what every replica says: a replica that uses content (serves it, copies it
from the bucket, hands out a URL of it, or pins it) refreshes the content's use marker, at most
every MARK_INTERVAL. Any replica may evict; they agree because they read the same markers.

Nothing a replica is serving is evicted from under it:
- content used within GRACE (several marker intervals) is never a candidate, and a candidate's
  marker is read again just before it is deleted;
- a replica serves its own local copy (an open file is sent whole whatever happens to the
  bucket), and a copy from the bucket that finds the object gone falls back to upstream.
Pinned content is marked as used at every pass, so no replica evicts what any replica pins.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from mirror.metrics import Metrics
from mirror.proxy.shared import MARK_INTERVAL, SharedContent
from mirror.storage.bucket import BucketError, StoredObject

log = logging.getLogger("mirror.eviction")

GRACE = 3 * MARK_INTERVAL  # content used more recently than this is never evicted
EVERY = 300.0  # seconds between passes
LOW_MARK = 0.9  # a pass evicts down to this share of the cap


class BucketEvictor:
    """Evicts from `shared`'s bucket beyond `cap` bytes (None: only marks pins as used);
    `pinned()` gives this replica's pinned digests."""

    def __init__(self, shared: SharedContent, cap: int | None, pinned: Callable[[], Awaitable[set[str]]],
                 metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.shared = shared
        self.cap = cap
        self.pinned = pinned
        self.metrics = metrics
        self.clock = clock

    async def run(self) -> None:
        """The background loop: a pass every EVERY seconds; a failing bucket is logged and tried again."""
        while True:
            try:
                await self.evict()
            except BucketError as exc:
                log.warning("eviction on the shared bucket failed, will try again: %s", exc)
            except Exception:
                log.exception("eviction on the shared bucket failed; will try again")
            await asyncio.sleep(EVERY)

    async def evict(self) -> tuple[int, int]:
        """One pass: mark pins as used, then evict the least recently used content down to the
        low mark if the bucket is over its cap. Returns (objects, bytes) removed; raises BucketError."""
        pinned = await self.pinned()
        for digest in pinned:
            self.shared.used(digest)
        if self.cap is None:
            return 0, 0
        objects = await self.shared.bucket.objects()
        total = sum(o.size for o in objects)
        if total <= self.cap:
            return 0, 0
        target = int(self.cap * LOW_MARK)
        cutoff = self.clock() - GRACE
        removed, freed = 0, 0
        for candidate in sorted(objects, key=lambda o: o.used):
            if total - freed <= target:
                break
            if candidate.used > cutoff or candidate.digest in pinned or not await self._still_unused(candidate, cutoff):
                continue
            await self.shared.bucket.delete([candidate.digest])
            removed += 1
            freed += candidate.size
        self.metrics.bucket_evictions.inc(removed)
        self.metrics.bucket_evicted_bytes.inc(freed)
        if removed:
            log.info("evicted %d objects (%.1f MiB) from %s, over its cap of %.1f MiB",
                     removed, freed / 2**20, self.shared.bucket.location, self.cap / 2**20)
        if total - freed > self.cap:
            log.warning("%s stays over its cap (%.1f of %.1f MiB): the rest was used within the last %d minutes "
                        "or is pinned", self.shared.bucket.location, (total - freed) / 2**20, self.cap / 2**20,
                        GRACE // 60)
        return removed, freed

    async def _still_unused(self, candidate: StoredObject, cutoff: float) -> bool:
        """Whether `candidate` was not used since it was listed (another replica may have just begun to)."""
        used = await self.shared.bucket.used(candidate.digest)
        return used is None or used <= cutoff
