"""The upstream client: token dance and cache, failures with clear messages, timeouts."""
from __future__ import annotations

import asyncio
import socket

import pytest

from mirror.config import UpstreamConfig
from mirror.metrics import Metrics
from mirror.upstream.authorizer import TokenCache
from mirror.upstream.challenges import parse_challenge
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError
from mirror.upstream.ratelimit import RateLimits
from tests.credentials import FINGERPRINTS
from tests.conftest import TAG_TTL, FakeClock, Mirror
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT


def test_parse_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                        'scope="repository:library/alpine:pull"')
    assert c is not None and c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["scope"] == "repository:library/alpine:pull"
    assert parse_challenge('Basic realm="x"') == parse_challenge('basic realm=x')
    assert parse_challenge("Negotiate abc") is None
    assert parse_challenge("") is None


async def test_one_token_serves_many_requests_until_it_expires(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.require_auth = True
    fake_registry.clock = mirror.clock
    fake_registry.expires_in = 300
    image = fake_registry.add_image("library/alpine", "3", 3)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    for digest in image.layer_digests:
        assert (await mirror.client.get(f"/v2/library/alpine/blobs/{digest}")).status == 200
    assert fake_registry.count(kind="token") == 1
    mirror.clock.advance(TAG_TTL + 1)  # past the token's expiry and the tag TTL: upstream is asked
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    assert fake_registry.count(kind="token") == 2


async def test_basic_challenge_without_credentials_is_unauthorized(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.require_auth = True
    fake_registry.auth_scheme = "basic"
    fake_registry.add_image("library/alpine", "3", 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 401
    assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"


def _upstream(url: str, **timeouts: float) -> Upstream:
    metrics, clock = Metrics(), FakeClock()
    return Upstream(UpstreamConfig("test", url, **timeouts), TokenCache(clock), RateLimits(metrics, clock), metrics, FINGERPRINTS)


async def test_connection_refused_names_the_host() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = _upstream(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamError) as caught:
        await upstream.head_manifest("library/a", "1", "*/*", None)
    await upstream.close()
    assert caught.value.status is None and caught.value.outage
    assert f"127.0.0.1:{port}" in caught.value.message


async def test_unresolvable_host_is_reported_as_such() -> None:
    upstream = _upstream("http://no-such-host.invalid")
    with pytest.raises(UpstreamError) as caught:
        await upstream.head_manifest("library/a", "1", "*/*", None)
    await upstream.close()
    assert "no-such-host.invalid" in caught.value.message


async def test_hung_upstream_times_out(fake_registry: FakeRegistry) -> None:
    fake_registry.stall_before_headers = True
    assert fake_registry.url
    upstream = _upstream(fake_registry.url, read_timeout=0.2)
    with pytest.raises(UpstreamError) as caught:
        await upstream.head_manifest("library/a", "1", "*/*", None)
    await upstream.close()
    fake_registry.stall_before_headers = False
    assert caught.value.outage and "timed out" in caught.value.message


async def test_stalled_blob_body_fails_the_fetch_and_caches_nothing(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest = fake_registry.add_blob("library/app", b"x" * 500_000)
    fake_registry.stall = asyncio.Event()  # never set: the body stops after the first chunk
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    with pytest.raises(Exception):
        await resp.read()
    assert mirror.services.blobs.store.size(digest) is None
    assert list((mirror.data_dir / "tmp").iterdir()) == []
    fake_registry.stall.set()
