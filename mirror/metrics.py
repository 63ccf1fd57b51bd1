"""Every Prometheus metric, on a per-app registry so tests and apps stay isolated.

The names are an interface: the Grafana dashboard and users' alerts use them.

Series that rates and ratios are computed from are created at zero when the app
starts, so the first hit after a restart is counted by `increase()` instead of
being the invisible first sample of a new series.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterator, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


log = logging.getLogger("mirror.metrics")

RESULTS = ("hit", "miss", "stale", "coalesced", "denied", "error")
CONTENT_KINDS = ("manifest", "blob")


class CacheUsage(NamedTuple):
    """What the cache holds: total bytes and object counts by kind (manifest, blob)."""

    size_bytes: int
    objects: dict[str, int]


class Metrics:
    """The mirror's metrics; with `multiprocess_dir`, one worker's share of a group's.

    Worker processes of a group write their values to files in that directory
    (prometheus_client's multiprocess mode) and any of them answers a scrape
    with the sums over all of them.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir:
            _use_multiprocess_values(multiprocess_dir)
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "mirror_requests", "Client requests by kind and cache result",
            ["kind", "method", "result"], registry=r)
        self.request_duration = Histogram(
            "mirror_request_duration_seconds", "Time to answer a client request (headers and body)",
            ["kind"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.bytes_served = Counter(
            "mirror_bytes_served", "Body bytes sent to clients, by where they came from",
            ["source"], registry=r)
        self.upstream_requests = Counter(
            "mirror_upstream_requests", "Requests sent to upstream registries",
            ["upstream", "method", "kind", "status"], registry=r)
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes", "Body bytes received from upstream registries",
            ["upstream"], registry=r)
        self.upstream_ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining", "Pulls left in the upstream's rate-limit window (ratelimit-remaining)",
            ["upstream", "source"], registry=r, multiprocess_mode="livemostrecent")
        self.upstream_ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit", "Pulls allowed per upstream rate-limit window (ratelimit-limit)",
            ["upstream", "source"], registry=r, multiprocess_mode="livemostrecent")
        self.stale_served = Counter(
            "mirror_stale_served", "Stale tags served because the upstream could not be asked",
            ["upstream", "reason"], registry=r)
        self.tag_revalidations = Counter(
            "mirror_tag_revalidations", "Upstream revalidations of expired tags",
            ["result"], registry=r)
        self.inflight_fetches = Gauge(
            "mirror_inflight_fetches", "Blob fetches in progress (from upstream, or copies from a fleet's bucket)", registry=r,
            multiprocess_mode="livesum")
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches", "Upstream content that did not match its digest (discarded)",
            ["upstream"], registry=r)
        self.store_failures = Counter(
            "mirror_store_failures", "Fetched content that could not be written to disk (passed through uncached)",
            ["reason"], registry=r)
        self.evictions = Counter(
            "mirror_evictions", "Content objects removed from the cache to stay under its size cap", registry=r)
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes", "Bytes removed from the cache to stay under its size cap", registry=r)
        self.bucket_requests = Counter(
            "mirror_bucket_requests", "Requests to the shared bucket (storage.backend s3), by operation and outcome "
            "(ok, absent, error; timeout: a client request gave up waiting; aborted: an upload whose fetch failed)", ["op", "outcome"], registry=r)
        self.bucket_request_duration = Histogram(
            "mirror_bucket_request_duration_seconds", "Time the shared bucket took to answer (to headers for GET)",
            ["op"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.bucket_uploads = Gauge(
            "mirror_bucket_uploads", "Uploads to the shared bucket in progress (a blob is shared once its upload ends)",
            registry=r, multiprocess_mode="livesum")
        self.bucket_bytes = Counter(
            "mirror_bucket_bytes", "Content bytes moved to (up) and from (down) the shared bucket",
            ["direction"], registry=r)
        self.bucket_discarded = Counter(
            "mirror_bucket_discarded", "Objects in the shared bucket whose bytes did not match their digest (deleted)",
            registry=r)
        self.bucket_evictions = Counter(
            "mirror_bucket_evictions", "Content objects removed from the shared bucket to stay under storage.s3.max_size",
            registry=r)
        self.bucket_evicted_bytes = Counter(
            "mirror_bucket_evicted_bytes", "Bytes removed from the shared bucket to stay under storage.s3.max_size",
            registry=r)
        self.client_disconnects = Counter(
            "mirror_client_disconnects", "Clients that closed their connection before their answer was whole "
            "(normal: a cancelled pull or a client-side timeout), by request kind",
            ["kind"], registry=r)
        self.cache = CacheCollector()
        r.register(self.cache)
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram, Counter]] = {}
        for kind in CONTENT_KINDS:
            self.request_duration.labels(kind)
            for method in ("GET", "HEAD"):
                for result in RESULTS:
                    self.requests.labels(kind, method, result)
        for kind in CONTENT_KINDS:
            self.client_disconnects.labels(kind)
        for source in ("cache", "upstream"):
            self.bytes_served.labels(source)
        for result in ("unchanged", "changed", "error"):
            self.tag_revalidations.labels(result)

    def count_request(self, kind: str, method: str, result: str, seconds: float, body_bytes: int | None) -> None:
        """One client request: its result, duration and (for content served) body bytes by source.

        The labelled children are looked up once per label set: `labels()` takes a
        lock and builds a tuple, a measurable share of a cached manifest request.
        """
        key = (kind, method, result)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(kind, method, result),
                self.request_duration.labels(kind),
                self.bytes_served.labels("upstream" if result == "miss" else "cache"),
            )
        counter, duration, served = children
        counter.inc()
        duration.observe(seconds)
        if body_bytes is not None:
            served.inc(body_bytes)

    def exposition(self) -> CollectorRegistry:
        """What a scrape reads: this registry, or the sums over a group's workers plus the cache."""
        if not self.multiprocess_dir:
            return self.registry
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_GroupCollector(self.multiprocess_dir, self._described()))
        registry.register(self.cache)
        return registry

    def request_counts(self) -> Iterator[Metric]:
        """`mirror_requests`, summed over a group's workers if there are several (no cache query)."""
        if not self.multiprocess_dir:
            return iter(self.requests.collect())
        return (family for family in MultiProcessCollector(None, self.multiprocess_dir).collect()
                if family.name == "mirror_requests")

    def _described(self) -> dict[str, Metric]:
        """Our metrics' families without samples: names, types and help texts."""
        return {family.name: family for metric in vars(self).values() if isinstance(metric, MetricWrapperBase)
                for family in metric.describe()}

    def watch_cache(self, usage: Callable[[], CacheUsage | None], max_bytes: Callable[[], int | None]) -> None:
        """Report the cache's usage and its cap (e.g. `Stats.read_usage`, `Evictor.cap`) at scrape time."""
        self.cache.usage = usage
        self.cache.max_bytes = max_bytes


class _GroupCollector(Collector):
    """The sums over a group's workers, as a single process would export them.

    The multiprocess files keep values only: help texts are put back, and metrics
    no worker has a sample of yet are still described, so the set of names does not
    depend on what has happened since the start.
    """

    def __init__(self, directory: str, described: dict[str, Metric]) -> None:
        self._directory = directory
        self._described = described

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in MultiProcessCollector(None, self._directory).collect():
            if (known := self._described.get(family.name)) is not None:
                family.documentation = known.documentation
            seen.add(family.name)
            yield family
        yield from (family for name, family in self._described.items() if name not in seen)


class CacheCollector(Collector):
    """`mirror_cache_size_bytes`, `mirror_cache_objects{kind}` and `mirror_cache_max_bytes`.

    Computed when scraped, by the callables `Metrics.watch_cache` installs. Until
    then (or when they cannot tell) the families are exported without samples:
    an absent value, never a made-up zero.
    """

    def __init__(self) -> None:
        self.usage: Callable[[], CacheUsage | None] | None = None
        self.max_bytes: Callable[[], int | None] | None = None

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(_ask(self.usage), _ask(self.max_bytes))

    @staticmethod
    def _families(usage: CacheUsage | None, max_bytes: int | None) -> Iterator[Metric]:
        size = GaugeMetricFamily("mirror_cache_size_bytes", "Bytes of verified content in the cache")
        objects = GaugeMetricFamily("mirror_cache_objects", "Content objects in the cache, by kind", labels=["kind"])
        cap = GaugeMetricFamily("mirror_cache_max_bytes", "The cache's size cap (cache.max_size) in bytes")
        if usage is not None:
            size.add_metric([], usage.size_bytes)
            for kind in sorted(set(CONTENT_KINDS) | set(usage.objects)):
                objects.add_metric([kind], usage.objects.get(kind, 0))
        if max_bytes is not None:
            cap.add_metric([], max_bytes)
        yield size
        yield objects
        yield cap


T = TypeVar("T")


def _use_multiprocess_values(directory: str) -> None:
    """Make metrics created from now on in this process keep their values in `directory`.

    prometheus_client picks its value class from PROMETHEUS_MULTIPROC_DIR when it is
    imported; a forked worker sets both before it creates any metric. Its values ask for
    the process id at every change, to notice a fork; a worker forks no more, so it is
    asked once here (the `getpid` system calls were an eighth of a cached manifest hit).
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    pid = os.getpid()
    values.ValueClass = values.MultiProcessValue(lambda: pid)


def _ask(source: Callable[[], T | None] | None) -> T | None:
    """A source's answer; a failing source leaves its samples out rather than failing the scrape."""
    if source is None:
        return None
    try:
        return source()
    except Exception:
        log.exception("cannot compute a cache metric")
        return None
