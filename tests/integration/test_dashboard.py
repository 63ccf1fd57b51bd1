"""Every PromQL expression of the Grafana dashboard (and of deploy/alerts.yml) runs on a real
Prometheus scraping a real mirror, and names only metrics the mirror exports."""
from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.images import DOCKER_MANIFEST, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.prometheus import (  # noqa: F401
    Prometheus, dashboard_exprs, metric_names, to_promql,
)
from tests.integration.registry import UpstreamRegistry

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "alerts.yml"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": (), "info": ("_info",), "unknown": ()}
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def exported_series_names(mirror: MirrorProcess) -> set[str]:
    """Every series name the mirror's /metrics declares (families, with their type's suffixes)."""
    with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def pull_something(upstream: UpstreamRegistry, mirror: MirrorProcess, repo: str) -> None:
    """A miss and a hit of a manifest and of a blob, so the ratio and latency series have data."""
    image = push_image(upstream, repo, "v1", layers=1)
    for _ in range(2):
        for path in (f"{repo}/manifests/v1", f"{repo}/blobs/{image.blobs[-1].digest}"):
            request = urllib.request.Request(f"{mirror.url}/v2/{path}", headers={"Accept": DOCKER_MANIFEST})
            with urllib.request.urlopen(request, timeout=30) as resp:
                resp.read()


def test_every_dashboard_expression_runs_and_names_exported_metrics(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str,
    prometheus_factory: Callable[[list[str]], Prometheus],
) -> None:
    prometheus = prometheus_factory([mirror_proc.host])
    prometheus.wait_scraped()
    pull_something(upstream, mirror_proc, repo)
    prometheus.wait_for('sum(mirror_requests_total{kind=~"manifest|blob"})', lambda v: v == 4, "requests")
    exported = exported_series_names(mirror_proc)

    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    failures = []
    for title, expr in exprs:
        for window in ("1m", "1h"):  # a typical $__rate_interval and a whole range
            answer = prometheus.api(to_promql(expr, window))
            if answer.get("status") != "success":
                failures.append(f"{title}: {expr}\n  → {answer.get('errorType')}: {answer.get('error')}")
        unknown = metric_names(to_promql(expr, "1m")) - exported
        if unknown:
            failures.append(f"{title}: {expr}\n  → names metrics the mirror does not export: {sorted(unknown)}")
    assert not failures, "\n".join(failures)

    # the instance variable lists the scraped mirror
    (instances,) = [to_promql(e, "1m") for t, e in exprs if t == "variable instance"]
    assert [r["metric"]["instance"] for r in prometheus.query(instances)] == [mirror_proc.host]
    # and data flows into the panels that have it by now
    for title in ("Hit ratio (requests)", "Hit ratio (bytes)", "Request latency p50 / p99"):
        (expr, *_) = [e for t, e in exprs if t == title]
        assert prometheus.query(to_promql(expr, "1h")), title


def test_alert_rules_name_exported_metrics(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str,
    prometheus_factory: Callable[[list[str]], Prometheus],
) -> None:
    prometheus = prometheus_factory([mirror_proc.host])
    prometheus.wait_scraped()
    exported = exported_series_names(mirror_proc) | PROMETHEUS_OWN
    rules = [r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]]
    assert rules
    for rule in rules:
        assert metric_names(rule["expr"]) <= exported, rule["alert"]
        prometheus.query(rule["expr"])  # raises unless Prometheus accepts it
    assert prometheus.value('up{job="mirror"}') == 1


def test_metric_names_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, kind) (rate(mirror_request_duration_seconds_bucket'
            '{instance=~".*",kind=~"manifest|blob"}[5m]))) / on(instance) group_left max(mirror_cache_max_bytes)'
            ' or vector(0)')
    assert metric_names(expr) == {"mirror_request_duration_seconds_bucket", "mirror_cache_max_bytes"}
    assert metric_names('sum(increase(x_total{a="sum(y)"}[1h])) / sum(z offset 5m)') == {"x_total", "z"}
