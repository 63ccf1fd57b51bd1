"""A real Prometheus scrapes a mirror subprocess; after a known sequence of pulls, the dashboard's
hit-ratio, bytes-saved and pulls-saved expressions give the expected values."""
from __future__ import annotations

import urllib.request
from collections.abc import Callable

import pytest

from tests.integration.images import DOCKER_MANIFEST, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.prometheus import Prometheus, dashboard_exprs, to_promql
from tests.integration.registry import UpstreamRegistry

pytestmark = pytest.mark.integration

WINDOW = "1h"  # covers the whole test: every series starts inside it, at zero


def fetch(mirror: MirrorProcess, path: str) -> bytes:
    request = urllib.request.Request(f"{mirror.url}/v2/{path}", headers={"Accept": DOCKER_MANIFEST})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
        return resp.read()


def panel_exprs(title: str) -> list[str]:
    """The PromQL of the dashboard's panel(s) titled `title`, Grafana's variables filled in."""
    found = [to_promql(e, WINDOW) for t, e in dashboard_exprs() if t == title]
    assert found, title
    return found


def panel_expr(title: str) -> str:
    return panel_exprs(title)[0]


def test_dashboard_ratios_after_a_known_sequence_of_pulls(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str,
    prometheus_factory: Callable[[list[str]], Prometheus],
) -> None:
    prometheus = prometheus_factory([mirror_proc.host])
    prometheus.wait_scraped()
    image = push_image(upstream, repo, "v1", layers=3)
    content = len(image.manifest) + sum(b.size for b in image.blobs)

    for _ in range(2):  # the first time from upstream (misses), the second from the cache (hits)
        assert fetch(mirror_proc, f"{repo}/manifests/v1") == image.manifest
        for blob in image.blobs:
            assert len(fetch(mirror_proc, f"{repo}/blobs/{blob.digest}")) == blob.size

    requests = 1 + len(image.blobs)
    assert mirror_proc.metric("mirror_bytes_served_total", source="cache") == content
    assert mirror_proc.metric("mirror_bytes_served_total", source="upstream") == content
    # Prometheus has the final state once it scraped these totals
    prometheus.wait_for('sum(mirror_requests_total{kind=~"manifest|blob"})', lambda v: v == 2 * requests, "requests")
    prometheus.wait_for("sum(mirror_bytes_served_total)", lambda v: v == 2 * content, "bytes")
    at = prometheus.last_scrape()

    assert prometheus.value(panel_expr("Hit ratio (requests)"), at) == pytest.approx(0.5, abs=1e-9)
    assert prometheus.value(panel_expr("Hit ratio (bytes)"), at) == pytest.approx(0.5, abs=1e-9)
    assert prometheus.value(panel_expr("Bytes saved"), at) == pytest.approx(content, abs=1e-6)
    assert prometheus.value(panel_expr("Pulls saved"), at) == pytest.approx(1, abs=1e-9)
    assert prometheus.value(panel_expr("Digest mismatches"), at) == 0
    # the time series: the same ratios with $__rate_interval, by requests and by bytes
    by_requests, by_bytes = panel_exprs("Hit ratio")
    assert prometheus.value(by_requests, at) == pytest.approx(0.5, abs=1e-9)
    assert prometheus.value(by_bytes, at) == pytest.approx(0.5, abs=1e-9)
    # and nothing went wrong upstream
    assert prometheus.value(panel_expr("Upstream errors"), at) == 0
