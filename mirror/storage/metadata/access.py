"""Access decisions: upstream's last answer to "may this principal read this repository?".

A principal is `anonymous` or a credential's fingerprint (never the credential itself).
Decisions are written behind, at once but in the background; until then they are answered
from memory.
"""
from __future__ import annotations

from typing import Iterable

from mirror.storage.metadata.database import Database, coalesced
from mirror.storage.metadata.writebehind import Decision, WriteBehind


class AccessDecisions:
    def __init__(self, db: Database, batch: WriteBehind) -> None:
        self._db = db
        self._batch = batch

    async def get(self, upstream: str, repo: str, principal: str) -> Decision | None:
        """(allowed, decided at (epoch seconds), upstream's message), or None if never asked."""
        key = (upstream, repo, principal)
        pending = self._batch.decision(key)
        return pending if pending is not None else await self._read(*key)

    @coalesced
    async def _read(self, upstream: str, repo: str, principal: str) -> Decision | None:
        row = await self._db.fetchone(
            "SELECT allowed, decided_at, message FROM access WHERE upstream=? AND repo=? AND principal=?",
            (upstream, repo, principal),
        )
        return (bool(row[0]), float(row[1]), str(row[2])) if row else None

    def record(self, upstream: str, repo: str, principal: str, allowed: bool, at: float, message: str) -> None:
        """Keep a decision; it is written in the background, so the client that brought it waits
        for no database write, and other worker processes read it a moment later."""
        self._batch.decide((upstream, repo, principal), (allowed, at, message))

    async def readable_repositories(self, principal: str, open_upstreams: Iterable[str]) -> list[tuple[str, str]]:
        """(upstream, repo) of repositories with cached content that `principal` may read:
        upstream's last answer for it was yes (decisions not yet written count), or the upstream
        is one of `open_upstreams`. Sorted."""
        open_ = set(open_upstreams)
        rows = await self._db.fetchall(
            "SELECT DISTINCT l.upstream, l.repo, a.allowed FROM links l LEFT JOIN access a"
            " ON a.upstream = l.upstream AND a.repo = l.repo AND a.principal = ?",
            (principal,),
        )
        readable = set()
        for upstream, repo, allowed in rows:
            pending = self._batch.decision((upstream, repo, principal))
            if upstream in open_ or (pending[0] if pending is not None else bool(allowed)):
                readable.add((upstream, repo))
        return sorted(readable)
