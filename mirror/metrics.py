"""Every Prometheus metric, on a per-app registry so tests and apps stay isolated.

The names are an interface: the Grafana dashboard and users' alerts use them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
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
        self.stale_served = Counter(
            "mirror_stale_served", "Stale tags served because the upstream could not be asked",
            ["upstream", "reason"], registry=r)
        self.tag_revalidations = Counter(
            "mirror_tag_revalidations", "Upstream revalidations of expired tags",
            ["result"], registry=r)
        self.inflight_fetches = Gauge(
            "mirror_inflight_fetches", "Blob fetches from upstream in progress", registry=r)
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches", "Upstream content that did not match its digest (discarded)",
            ["upstream"], registry=r)
