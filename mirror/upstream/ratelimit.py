"""Docker-Hub-style rate limits: what upstream says is left, and when a principal may ask again.

Every upstream response may carry `ratelimit-limit: 100;w=21600`,
`ratelimit-remaining: 76;w=21600` and `docker-ratelimit-source: <ip or account>`;
the values become gauges. After a 429, that principal sends no GET to that
upstream until `Retry-After` has passed (HEADs, which Docker Hub does not
count, may go on), so a throttled mirror does not dig itself deeper.
"""
from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from cachetools import TTLCache

from mirror.metrics import Metrics

log = logging.getLogger("mirror.ratelimit")

DEFAULT_RETRY_AFTER = 60.0
LOW_WATER = 0.10


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    window: int | None
    source: str


def _count(value: str) -> tuple[int, int | None]:
    """`"100;w=21600"` → (100, 21600)."""
    head, *params = value.split(";")
    window = None
    for param in params:
        key, _, val = param.strip().partition("=")
        if key == "w" and val.isdigit():
            window = int(val)
    return int(head.strip()), window


def parse(headers: Mapping[str, str]) -> RateLimit | None:
    """The rate-limit headers of a response, or None when absent or malformed."""
    if "ratelimit-limit" not in headers or "ratelimit-remaining" not in headers:
        return None
    try:
        limit, window = _count(headers["ratelimit-limit"])
        remaining, _ = _count(headers["ratelimit-remaining"])
    except ValueError:
        return None
    source = headers.get("docker-ratelimit-source", "").split(";")[0].strip() or "unknown"
    return RateLimit(limit, remaining, window, source)


def retry_after_seconds(value: str | None, now: float) -> float:
    """Seconds to wait from a `Retry-After` (seconds or an HTTP date); a default when absent."""
    if not value:
        return DEFAULT_RETRY_AFTER
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - now, 0.0)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER


class RateLimits:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._blocked: TTLCache[tuple[str, str], float] = TTLCache(100_000, 86_400, timer=clock)

    def observe(self, upstream: str, headers: Mapping[str, str]) -> None:
        found = parse(headers)
        if found is None:
            return
        self._metrics.upstream_ratelimit_limit.labels(upstream, found.source).set(found.limit)
        self._metrics.upstream_ratelimit_remaining.labels(upstream, found.source).set(found.remaining)
        if found.limit and found.remaining < found.limit * LOW_WATER:
            log.warning("upstream %s: only %d of %d pulls left for %s", upstream, found.remaining, found.limit, found.source)

    def block(self, upstream: str, who: str, retry_after: str | None) -> None:
        """Remember a 429: no GET for `who` until Retry-After has passed."""
        now = self._clock()
        self._blocked[(upstream, who)] = now + retry_after_seconds(retry_after, now)

    def blocked_for(self, upstream: str, who: str) -> float:
        """Seconds `who` must still wait before a GET to `upstream` (0 when free)."""
        until = self._blocked.get((upstream, who))
        return max(until - self._clock(), 0.0) if until else 0.0
