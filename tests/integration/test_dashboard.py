"""Every PromQL expression of the Grafana dashboard (and of deploy/alerts.yml) runs on a real
Prometheus scraping a real mirror, and names only metrics the mirror exports."""
from __future__ import annotations

import math
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
    exported = exported_series_names(mirror_proc) | PROMETHEUS_OWN

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


def test_fleet_row_shows_each_replica_and_the_fleet(
    upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorProcess], repo: str,
    prometheus_factory: Callable[[list[str]], Prometheus],
) -> None:
    """Two replicas scraped by one Prometheus: one pulls two images twice each (a miss, then a hit,
    of a manifest and a blob), the other nothing. Each per-replica panel has a series per replica, and its
    fleet series sums them."""
    cap = 10**9
    busy, idle = (mirror_factory(extra=f'\n[cache]\nmax_size = "{cap}B"\n') for _ in range(2))
    prometheus = prometheus_factory([busy.host, idle.host])
    prometheus.wait_for('count(mirror_requests_total{kind="blob",method="GET",result="hit"})', lambda v: v == 2,
                        "both replicas scraped")
    # upstream request series are born at their first request, which rate() cannot see: a second
    # image after Prometheus has them makes the increase visible
    pull_something(upstream, busy, repo)
    prometheus.wait_for('count(mirror_upstream_requests_total{method="GET",kind="blob"})', lambda v: bool(v),
                        "upstream series")
    pull_something(upstream, busy, f"{repo}-2")
    prometheus.wait_for('sum(mirror_requests_total{kind=~"manifest|blob"})', lambda v: v == 8, "requests")
    prometheus.wait_for("count(mirror_cache_size_bytes > 0)", lambda v: v == 1, "cache size")
    at = prometheus.last_scrape()

    def results(title: str, now: bool = False) -> list[dict[str, float]]:
        """Per target of the panel: value by instance ("" for the fleet's unlabelled series)."""
        return [{r["metric"].get("instance", ""): float(r["value"][1])
                 for r in prometheus.query(to_promql(e, "1h"), None if now else at)}
                for t, e in dashboard_exprs() if t == title]

    for title in ("Hit ratio per replica (requests)", "Hit ratio per replica (bytes)"):
        per_replica, fleet = results(title)
        assert per_replica[busy.host] == fleet[""] == pytest.approx(0.5), title
        # the idle replica served nothing: no point (0/0 is NaN, or no series), a gap rather than 0
        assert math.isnan(per_replica.get(idle.host, math.nan)), title
    (served,) = [{(r["metric"]["instance"], r["metric"]["source"]) for r in prometheus.query(to_promql(e, "1h"), at)}
                 for t, e in dashboard_exprs() if t == "Bytes served per replica by source"]
    assert served == {(m.host, s) for m in (busy, idle) for s in ("cache", "upstream")}
    per_replica, fleet = results("Upstream fetches per replica")
    assert per_replica[busy.host] > 0 and per_replica.get(idle.host, 0) == 0
    assert fleet[""] == pytest.approx(sum(per_replica.values()))
    assert results("Replicas up") == [{"": 2}, {"": 2}]
    sizes, caps = results("Cache size per replica")
    assert sizes[busy.host] > 0 and sizes[idle.host] == 0 and caps == {busy.host: cap, idle.host: cap}

    idle.stop()
    prometheus.wait_for('sum(up{job="mirror"})', lambda v: v == 1, "one replica down")
    up, scraped = results("Replicas up", now=True)
    assert up == {"": 1} and scraped == {"": 2}


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
