"""Access times, hit counts and access decisions: kept in memory, written in batches.

A cache hit must never wait on a database write, so these are recorded in memory and
written every few seconds (access decisions at once, in the background). A write that
fails (SQLITE_BUSY, a full disk, an I/O error) loses nothing: its batch goes back in
front of what arrived meanwhile and is written with it next time.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mirror.storage.metadata.database import WRITE_ERRORS, Database

log = logging.getLogger("mirror.metadata")

RepoKey = tuple[str, str]  # (upstream, repo)
AccessKey = tuple[str, str, str]  # (upstream, repo, principal)
Decision = tuple[bool, float, str]  # (allowed, decided at (epoch seconds), upstream's message)


@dataclass
class Batch:
    """What is waiting to be written."""

    access_times: dict[str, float] = field(default_factory=dict)  # digest → epoch seconds
    hits: Counter[RepoKey] = field(default_factory=Counter)
    decisions: dict[AccessKey, Decision] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.access_times or self.hits or self.decisions)

    def merge(self, newer: Batch) -> None:
        """Take in what arrived after this batch: the latest access time wins, hit counts add,
        the newest decision wins."""
        for digest, at in newer.access_times.items():
            self.access_times[digest] = max(at, self.access_times.get(digest, at))
        self.hits.update(newer.hits)
        for key, decision in newer.decisions.items():
            older = self.decisions.get(key)
            if older is None or decision[1] >= older[1]:
                self.decisions[key] = decision


class WriteBehind:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending = Batch()
        self._writing: Batch | None = None  # taken out of `_pending`, not yet committed
        self._flushing = asyncio.Lock()
        self._soon: asyncio.Task[bool] | None = None
        self._failing = False  # the last write failed (and was logged)

    def touch(self, digests: Iterable[str], now: float) -> None:
        times = self._pending.access_times
        for digest in digests:
            if times.get(digest, 0.0) < now:  # never back in time
                times[digest] = now

    def count_hit(self, upstream: str, repo: str) -> None:
        self._pending.hits[(upstream, repo)] += 1

    def decide(self, key: AccessKey, decision: Decision) -> None:
        """Keep a decision and write it at once, in the background."""
        self._pending.decisions[key] = decision
        if self._soon is None or self._soon.done():
            self._soon = asyncio.get_running_loop().create_task(self.flush())

    def decision(self, key: AccessKey) -> Decision | None:
        """A decision not yet written, if there is one."""
        found = self._pending.decisions.get(key)
        if found is None and self._writing is not None:
            found = self._writing.decisions.get(key)
        return found

    async def flush(self) -> bool:
        """Write what is pending; False if the write failed and the batch was kept for the next.

        Hit counts are added to the stored ones (every worker process adds its own), an access
        time only moves a stored one forward. Logs the first failure of a streak and the recovery.
        """
        async with self._flushing:
            if not self._pending or not self._db.is_open:
                return True
            batch, self._pending = self._pending, Batch()
            self._writing = batch
            try:
                await self._write(batch)
            except WRITE_ERRORS as exc:
                batch.merge(self._pending)
                self._pending = batch
                if not self._failing:
                    log.error("cannot write access times, hit counts and access decisions (kept to retry): %s", exc)
                self._failing = True
                return False
            finally:
                self._writing = None
            if self._failing:
                log.info("access times, hit counts and access decisions written again")
                self._failing = False
            return True

    async def _write(self, batch: Batch) -> None:
        async with self._db.transaction() as db:
            await db.executemany(
                "UPDATE content SET last_access=max(last_access, ?) WHERE digest=?",
                [(at, digest) for digest, at in batch.access_times.items()],
            )
            await db.executemany(
                "INSERT INTO hits VALUES (?, ?, ?)"
                " ON CONFLICT (upstream, repo) DO UPDATE SET count=count+excluded.count",
                [(u, r, n) for (u, r), n in batch.hits.items()],
            )
            await db.executemany(
                "INSERT OR REPLACE INTO access VALUES (?, ?, ?, ?, ?, ?)",
                [(u, r, p, int(allowed), at, message) for (u, r, p), (allowed, at, message) in batch.decisions.items()],
            )
