"""Docker-Hub-style rate limits: parsing, gauges, and backing off after a 429."""
from __future__ import annotations

from mirror.upstream.ratelimit import parse, retry_after_seconds
from tests.conftest import TAG_TTL, Mirror
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT


def test_parse_docker_hub_headers() -> None:
    found = parse({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600",
                   "docker-ratelimit-source": "192.0.2.1"})
    assert found is not None
    assert (found.limit, found.remaining, found.window, found.source) == (100, 76, 21600, "192.0.2.1")
    assert parse({"ratelimit-limit": "100;w=21600"}) is None
    assert parse({"ratelimit-limit": "lots", "ratelimit-remaining": "1"}) is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_seconds("42", 0) == 42
    assert retry_after_seconds("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0
    assert retry_after_seconds(None, 0) == retry_after_seconds("soon", 0) == 60.0


async def test_gauges_show_what_upstream_last_said(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.ratelimit_headers = (100, 7)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    metrics = mirror.services.metrics
    assert metrics.upstream_ratelimit_remaining.labels("docker.io", "127.0.0.1")._value.get() == 7
    assert metrics.upstream_ratelimit_limit.labels("docker.io", "127.0.0.1")._value.get() == 100


async def test_after_a_429_no_get_goes_upstream_until_retry_after(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    cached = fake_registry.add_image("library/cached", "1", 1)
    await mirror.client.get("/v2/library/cached/manifests/1", headers=ACCEPT)
    await (await mirror.client.get(f"/v2/library/cached/blobs/{cached.layer_digests[0]}")).read()
    fake_registry.add_image("library/new", "1", 1)
    fake_registry.rate_limited = True
    fake_registry.retry_after = 120
    resp = await mirror.client.get("/v2/library/new/manifests/1", headers=ACCEPT)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "120"
    fake_registry.rate_limited = False  # upstream would answer now, but the window has not passed
    fake_registry.reset_counts()
    mirror.clock.advance(60)
    resp = await mirror.client.get("/v2/library/new/manifests/1", headers=ACCEPT)
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 61
    assert fake_registry.count(method="GET") == 0
    # cached content keeps flowing
    assert (await mirror.client.get("/v2/library/cached/manifests/1", headers=ACCEPT)).status == 200
    assert (await mirror.client.get(f"/v2/library/cached/blobs/{cached.layer_digests[0]}")).status == 200
    mirror.clock.advance(61)
    assert (await mirror.client.get("/v2/library/new/manifests/1", headers=ACCEPT)).status == 200
    assert fake_registry.count(method="GET") == 1


async def test_stale_tag_served_while_rate_limited(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/cached", "1", 1)
    await mirror.client.get("/v2/library/cached/manifests/1", headers=ACCEPT)
    fake_registry.set_tag("library/cached", "1", fake_registry.add_image("library/cached", None, 1).digest)
    fake_registry.rate_limited = True
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/cached/manifests/1", headers=ACCEPT)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert mirror.services.metrics.stale_served.labels("docker.io", "ratelimited")._value.get() == 1
