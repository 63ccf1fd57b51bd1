"""Tag lists pass through, with a short cache that also stands in while upstream is down."""
from __future__ import annotations

import time
from typing import Callable

from cachetools import LRUCache

from mirror.upstream.auth import Credentials, fingerprint
from mirror.upstream.client import Upstream, UpstreamError

FRESH_FOR = 30.0


class TagListService:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._last: LRUCache[tuple[str, str, str, str], tuple[float, bytes, str | None]] = LRUCache(10_000)

    async def get(
        self, upstream: Upstream, repo: str, query: str, creds: Credentials | None
    ) -> tuple[bytes, str | None, str]:
        """(body, Link header, result) for `/v2/<repo>/tags/list?<query>`, cached per principal."""
        key = (upstream.name, repo, query, fingerprint(creds))
        last = self._last.get(key)
        if last and self.clock() - last[0] < FRESH_FOR:
            return last[1], last[2], "hit"
        try:
            body, link = await upstream.get_tags(repo, query, creds)
        except UpstreamError as exc:
            if exc.outage and last:
                return last[1], last[2], "stale"
            raise exc.to_registry_error("NAME_UNKNOWN") from None
        self._last[key] = (self.clock(), body, link)
        return body, link, "miss"
