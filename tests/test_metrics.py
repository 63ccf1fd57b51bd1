"""/metrics after a known sequence of requests: every counter's exact value, both exposition formats.

The sequence goes through the mirror's HTTP API in front of the fake registry
(its fault switches make the stale, mismatch, denied and 429 cases), and the
values are read back from `/metrics` itself, as Prometheus would.
"""
from __future__ import annotations

import asyncio
import os

import aiohttp
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from mirror.cache.eviction import cap_bytes
from mirror.metrics import CacheUsage, Metrics
from tests.conftest import TAG_TTL, Mirror
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, labels sorted by name) → value

# The families whose every sample the sequence below pins down.
COUNTED = (
    "mirror_requests_total",
    "mirror_bytes_served_total",
    "mirror_upstream_requests_total",
    "mirror_upstream_bytes_total",
    "mirror_stale_served_total",
    "mirror_tag_revalidations_total",
    "mirror_digest_mismatches_total",
    "mirror_inflight_fetches",
    "mirror_evictions_total",
    "mirror_evicted_bytes_total",
)


async def scrape(mirror: Mirror) -> Samples:
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def nonzero(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """name's samples with a value, keyed by their label values in alphabetical order of label names."""
    return {tuple(v for _, v in labels): value
            for (n, labels), value in samples.items() if n == name and value}


async def _read_or_none(resp: aiohttp.ClientResponse) -> bytes | None:
    try:
        return await resp.read()
    except aiohttp.ClientPayloadError:
        return None


async def test_a_known_sequence_gives_exact_counter_values(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "v1", 2)
    layer = image.layer_digests[0]
    big = os.urandom(300_000)
    big_digest = fake_registry.add_blob("library/app", big)
    bad_digest = fake_registry.add_blob("library/app", os.urandom(10_000))
    fake_registry.add_image("library/secret", "v1", 1)
    fake_registry.private = {"library/secret": {"alice"}}
    fake_registry.add_image("library/app", "v2", 1)

    async def get(path: str, method: str = "GET", **headers: str) -> aiohttp.ClientResponse:
        resp = await mirror.client.request(method, f"/v2/{path}", headers={**ACCEPT, **headers})
        await _read_or_none(resp)
        await mirror.settled()  # the fetch stores after its clients have their bytes
        return resp

    # version check (the mirror's auth challenge): kind base, not content
    assert (await get("")).status == 401  # no credentials: challenged, as Docker Hub does
    # tag: miss (HEAD + GET upstream), then hit (nothing upstream)
    assert (await get("library/app/manifests/v1")).status == 200
    assert (await get("library/app/manifests/v1")).status == 200
    # blob: miss (one upstream GET), hit, and a HEAD hit
    assert (await get(f"library/app/blobs/{layer}")).status == 200
    assert (await get(f"library/app/blobs/{layer}")).status == 200
    assert (await get(f"library/app/blobs/{layer}", "HEAD")).status == 200

    # coalesced: a second client joins the fetch the first one started
    stall = asyncio.Event()
    fake_registry.stall = stall
    first = await mirror.client.get(f"/v2/library/app/blobs/{big_digest}")
    assert first.status == 200
    assert nonzero(await scrape(mirror), "mirror_inflight_fetches") == {(): 1}
    second = await mirror.client.get(f"/v2/library/app/blobs/{big_digest}")  # headers: it has joined
    assert second.status == 200
    stall.set()
    fake_registry.stall = None
    assert await first.read() == big and await second.read() == big

    # stale: the tag expired and upstream answers 503 → the cached copy, counted
    mirror.clock.advance(TAG_TTL + 1)
    fake_registry.fail_status = 503
    assert (await get("library/app/manifests/v1")).status == 200
    fake_registry.fail_status = None
    # revalidation: still expired, upstream says unchanged (one HEAD)
    assert (await get("library/app/manifests/v1")).status == 200
    # digest mismatch: the body does not hash to its digest → cut short, counted, not cached
    fake_registry.corrupt_blobs = True
    assert (await get(f"library/app/blobs/{bad_digest}")).status == 200
    fake_registry.corrupt_blobs = False
    # error: unknown tag
    assert (await get("library/app/manifests/nope")).status == 404
    # denied: upstream refuses an anonymous pull of a private repository
    assert (await get("library/secret/manifests/v1")).status == 401
    # rate-limited: upstream's HEAD is free, its GET answers 429 → relayed with Retry-After
    fake_registry.rate_limited = True
    resp = await get("library/app/manifests/v2")
    assert resp.status == 429 and resp.headers["Retry-After"] == "60"
    fake_registry.rate_limited = False

    samples = await scrape(mirror)
    assert nonzero(samples, "mirror_requests_total") == {
        # kind, method, result
        ("base", "GET", "denied"): 1,
        ("manifest", "GET", "miss"): 1,
        ("manifest", "GET", "hit"): 2,     # fresh, then revalidated unchanged
        ("manifest", "GET", "stale"): 1,
        ("manifest", "GET", "error"): 2,   # unknown tag, 429
        ("manifest", "GET", "denied"): 1,
        ("blob", "GET", "miss"): 2,        # layer, big
        ("blob", "GET", "hit"): 1,
        ("blob", "HEAD", "hit"): 1,
        ("blob", "GET", "coalesced"): 1,
        ("blob", "GET", "error"): 1,       # the mismatched one: its client got a truncated body
    }
    assert nonzero(samples, "mirror_bytes_served_total") == {
        ("cache",): len(image.body) * 3 + len(image.layers[0]) + len(big),  # 2 hits + stale, layer hit, coalesced
        ("upstream",): len(image.body) + len(image.layers[0]) + len(big),  # the misses
    }
    assert nonzero(samples, "mirror_upstream_requests_total") == {
        # kind, method, status, upstream
        ("manifest", "HEAD", "200", "docker.io"): 3,  # v1 miss, v1 revalidated, v2
        ("manifest", "GET", "200", "docker.io"): 1,   # v1 by digest
        ("manifest", "HEAD", "503", "docker.io"): 2,  # the outage: revalidation, then the access re-check by digest
        ("manifest", "HEAD", "404", "docker.io"): 1,  # unknown tag
        ("manifest", "HEAD", "401", "docker.io"): 2,  # private: challenge, then refused with a token
        ("token", "GET", "200", "docker.io"): 1,
        ("manifest", "GET", "429", "docker.io"): 1,
        ("blob", "GET", "200", "docker.io"): 3,       # layer, big, bad
    }
    assert nonzero(samples, "mirror_upstream_bytes_total") == {
        ("docker.io",): len(image.body) + len(image.layers[0]) + len(big) + 10_000,
    }
    assert nonzero(samples, "mirror_stale_served_total") == {("5xx", "docker.io"): 1}  # reason, upstream
    assert nonzero(samples, "mirror_tag_revalidations_total") == {("error",): 1, ("unchanged",): 1}
    assert nonzero(samples, "mirror_digest_mismatches_total") == {("docker.io",): 1}
    assert samples[("mirror_inflight_fetches", ())] == 0
    assert samples[("mirror_evictions_total", ())] == 0
    assert samples[("mirror_evicted_bytes_total", ())] == 0
    # every request was timed, by kind
    assert samples[("mirror_request_duration_seconds_count", (("kind", "manifest"),))] == 7
    assert samples[("mirror_request_duration_seconds_count", (("kind", "blob"),))] == 6


# Every metric DESIGN.md names: the dashboard and users' alerts depend on these names.
DESIGN_METRICS = {
    "mirror_requests": "counter",
    "mirror_request_duration_seconds": "histogram",
    "mirror_bytes_served": "counter",
    "mirror_upstream_requests": "counter",
    "mirror_upstream_bytes": "counter",
    "mirror_upstream_ratelimit_remaining": "gauge",
    "mirror_upstream_ratelimit_limit": "gauge",
    "mirror_stale_served": "counter",
    "mirror_tag_revalidations": "counter",
    "mirror_inflight_fetches": "gauge",
    "mirror_digest_mismatches": "counter",
    "mirror_cache_size_bytes": "gauge",
    "mirror_cache_max_bytes": "gauge",
    "mirror_cache_objects": "gauge",
    "mirror_evictions": "counter",
    "mirror_evicted_bytes": "counter",
}


async def test_prometheus_text_format_by_default_with_every_design_metric(mirror: Mirror) -> None:
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: families.get(name) for name in DESIGN_METRICS} == DESIGN_METRICS
    assert "# TYPE mirror_requests_total counter" in text


async def test_openmetrics_when_accept_asks_for_it(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "v1", 1)
    await mirror.client.get("/v2/library/app/manifests/v1", headers=ACCEPT)
    resp = await mirror.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = await resp.text()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert {name: families[name].type for name in DESIGN_METRICS} == DESIGN_METRICS
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["mirror_requests"].samples}
    assert values[("mirror_requests_total", (("kind", "manifest"), ("method", "GET"), ("result", "miss")))] == 1
    served = {s.labels["source"]: s.value for s in families["mirror_bytes_served"].samples if s.name.endswith("_total")}
    assert served == {"cache": 0, "upstream": len(image.body)}


async def test_ratio_series_exist_at_zero_from_the_start(mirror: Mirror) -> None:
    """So that `increase()` on the dashboard counts the first hit after a restart."""
    samples = await scrape(mirror)
    for kind in ("manifest", "blob"):
        for method in ("GET", "HEAD"):
            for result in ("hit", "miss", "stale", "coalesced", "denied", "error"):
                key = ("mirror_requests_total", (("kind", kind), ("method", method), ("result", result)))
                assert samples[key] == 0
    assert samples[("mirror_bytes_served_total", (("source", "cache"),))] == 0
    assert samples[("mirror_bytes_served_total", (("source", "upstream"),))] == 0
    for result in ("unchanged", "changed", "error"):
        assert samples[("mirror_tag_revalidations_total", (("result", result),))] == 0
    for kind in ("manifest", "blob"):
        assert samples[("mirror_request_duration_seconds_count", (("kind", kind),))] == 0


async def test_cache_gauges_have_no_value_until_wired_then_match_the_store(
    mirror: Mirror, fake_registry: FakeRegistry
) -> None:
    image = fake_registry.add_image("library/app", "v1", 2)
    await mirror.client.get("/v2/library/app/manifests/v1", headers=ACCEPT)
    for digest in image.layer_digests:
        await (await mirror.client.get(f"/v2/library/app/blobs/{digest}")).read()
    await mirror.settled()
    names = ("mirror_cache_size_bytes", "mirror_cache_objects", "mirror_cache_max_bytes")
    metrics: Metrics = mirror.services.metrics
    if metrics.cache.usage is None:  # not wired by the app: declared, but no made-up zero
        assert not [k for k in await scrape(mirror) if k[0] in names]
    metrics.watch_cache(mirror.services.manifests.metadata.stats.read_usage,
                        lambda: cap_bytes("2GiB", mirror.data_dir))
    samples = await scrape(mirror)
    assert samples[("mirror_cache_size_bytes", ())] == len(image.body) + sum(len(b) for b in image.layers)
    assert samples[("mirror_cache_objects", (("kind", "manifest"),))] == 1
    assert samples[("mirror_cache_objects", (("kind", "blob"),))] == 2
    assert samples[("mirror_cache_max_bytes", ())] == 2 * 1024**3


async def test_a_failing_cache_source_leaves_its_samples_out(mirror: Mirror) -> None:
    def broken() -> int:
        raise OSError("disk gone")

    mirror.services.metrics.watch_cache(lambda: CacheUsage(10, {"blob": 1}), broken)
    samples = await scrape(mirror)
    assert samples[("mirror_cache_size_bytes", ())] == 10
    assert samples[("mirror_cache_objects", (("kind", "blob"),))] == 1
    assert samples[("mirror_cache_objects", (("kind", "manifest"),))] == 0
    assert ("mirror_cache_max_bytes", ()) not in samples


async def test_upstream_rate_limit_headers_become_gauges(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "v1", 1)
    fake_registry.ratelimit_headers = (100, 76)
    assert (await mirror.client.get("/v2/library/app/manifests/v1", headers=ACCEPT)).status == 200
    samples = await scrape(mirror)
    labels = (("source", "127.0.0.1"), ("upstream", "docker.io"))
    assert samples[("mirror_upstream_ratelimit_remaining", labels)] == 76
    assert samples[("mirror_upstream_ratelimit_limit", labels)] == 100
