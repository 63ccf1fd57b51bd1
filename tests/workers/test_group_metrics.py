"""Metrics of a group: any worker's scrape gives the sums over all of them, described as one process would."""
from __future__ import annotations

import os

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import Metrics


def _count_in_another_process(directory: str, hits: int) -> None:
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            worker = Metrics(directory)
            for _ in range(hits):
                worker.count_request("manifest", "GET", "hit", 0.001, 100)
            worker.inflight_fetches.inc()  # still running, as far as anyone can tell
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_scrape_sums_the_workers_and_describes_every_metric(multiprocess_values: str) -> None:
    here = Metrics(multiprocess_values)
    here.count_request("manifest", "GET", "hit", 0.001, 100)
    _count_in_another_process(multiprocess_values, hits=4)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(here.exposition()).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("mirror_requests_total", (("kind", "manifest"), ("method", "GET"), ("result", "hit")))] == 5
    assert samples[("mirror_bytes_served_total", (("source", "cache"),))] == 500
    assert samples[("mirror_inflight_fetches", ())] == 1
    assert families["mirror_requests"].documentation == "Client requests by kind and cache result"
    # never incremented anywhere, yet described, as a single process describes it
    assert families["mirror_digest_mismatches"].documentation.startswith("Upstream content that did not match")
    assert {"mirror_upstream_ratelimit_remaining", "mirror_stale_served", "mirror_cache_size_bytes"} <= set(families)
