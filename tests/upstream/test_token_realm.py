"""The token realm as real upstreams run it: on another host (Docker Hub), answering 429
(kind 8), behind several challenges in any shape (kind 5)."""
from __future__ import annotations

import email.utils

import pytest

from mirror.upstream.errors import UpstreamError, retry_after_value
from mirror.upstream.ratelimit import DEFAULT_RETRY_AFTER
from tests.credentials import creds
from tests.conftest import TAG_TTL, Mirror
from tests.fakes.dialects import REALM_HOST, Dialect, Servers, TokenRealm
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT
from tests.upstream.conftest import MirrorFor


async def test_docker_hub_dialect_pulls_with_the_realm_on_another_host(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    image = hub.registry.add_image("library/alpine", "3", 2)
    mirror = await mirror_for(hub.url)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    for digest, layer in zip(image.layer_digests, image.layers):
        blob = await mirror.client.get(f"/v2/library/alpine/blobs/{digest}")
        assert blob.status == 200 and await blob.read() == layer
    assert len(hub.realm.requests) == 1 and hub.registry.count(kind="token") == 0
    assert hub.realm.requests[0].query.getall("scope") == ["repository:library/alpine:pull"]
    assert hub.registry.cdn_auth_headers == [None, None], "the CDN never sees the registry's token"


# -- kind 8: rate limits on the token endpoint ----------------------------------------------

async def test_kind8_token_realm_429_reaches_clients_with_retry_after(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    hub.registry.add_image("library/alpine", "3", 1)
    hub.realm.rate_limited, hub.realm.retry_after = True, "30"
    mirror = await mirror_for(hub.url)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "30"
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(hub.realm.requests) == 1


async def test_kind8_no_token_request_until_retry_after_has_passed(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    image = hub.registry.add_image("library/alpine", "3", 1)
    hub.realm.rate_limited, hub.realm.retry_after = True, "30"
    mirror = await mirror_for(hub.url)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    mirror.clock.advance(10)
    for path in ("manifests/3", f"manifests/{image.digest}", f"blobs/{image.layer_digests[0]}"):
        resp = await mirror.client.get(f"/v2/library/alpine/{path}", headers=ACCEPT)
        assert resp.status == 429, path
        assert 0 < int(resp.headers["Retry-After"]) <= 21
    assert len(hub.realm.requests) == 1, "the realm is left alone while it asked us to wait"
    hub.realm.rate_limited = False
    mirror.clock.advance(21)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    assert len(hub.realm.requests) == 2


async def test_kind8_a_realm_429_without_retry_after_gets_the_default(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    hub.registry.add_image("library/alpine", "3", 1)
    hub.realm.rate_limited, hub.realm.retry_after = True, None
    mirror = await mirror_for(hub.url)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 429 and resp.headers["Retry-After"] == str(int(DEFAULT_RETRY_AFTER))


async def test_kind8_stale_tag_is_served_while_the_realm_rate_limits(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    image = hub.registry.add_image("library/alpine", "3", 1)
    mirror = await mirror_for(hub.url)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    hub.realm.rate_limited = True
    mirror.clock.advance(TAG_TTL + 1)  # the tag and the token are both stale: a new token is needed
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200 and await resp.read() == image.body
    assert mirror.services.metrics.stale_served.labels("docker.io", "ratelimited")._value.get() == 1
    assert len(hub.realm.requests) == 2


async def test_kind8_a_login_while_the_realm_rate_limits_is_429_with_retry_after(
    hub: Dialect, mirror_for: MirrorFor
) -> None:
    assert hub.realm is not None
    hub.registry.users = {"alice": "alice-pw"}
    hub.realm.rate_limited, hub.realm.retry_after = True, "45"
    mirror = await mirror_for(hub.url, token_realms=(REALM_HOST,))
    resp = await mirror.client.get("/token", params={"service": "mirror", "scope": "repository:library/alpine:pull"},
                                   headers={"Authorization": creds("alice", "alice-pw").basic})
    assert resp.status == 429 and resp.headers["Retry-After"] == "45"
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_kind8_registry_429_without_retry_after_still_carries_one(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.rate_limited = True
    fake_registry.retry_after = ""  # type: ignore[assignment]  # an empty header, as some proxies send
    resp = await mirror.client.get(f"/v2/library/alpine/blobs/{image.layer_digests[0]}")
    assert resp.status == 429 and resp.headers["Retry-After"] == str(int(DEFAULT_RETRY_AFTER))


@pytest.mark.parametrize(("given", "sent"), [
    (None, "60"), ("", "60"), ("soon", "60"), ("-5", "60"), ("1.5", "60"), ("120", "120"), (" 7 ", "7"),
    ("Wed, 21 Oct 2037 07:28:00 GMT", "Wed, 21 Oct 2037 07:28:00 GMT"),
])
def test_kind8_every_429_carries_a_usable_retry_after(given: str | None, sent: str) -> None:
    assert str(int(DEFAULT_RETRY_AFTER)) == "60"
    error = UpstreamError("docker.io", 429, "rate-limited", given).to_registry_error("MANIFEST_UNKNOWN")
    assert error.status == 429 and error.code == "TOOMANYREQUESTS"
    assert error.headers["Retry-After"] == sent == retry_after_value(given)
    if sent != "60" and not sent.isdigit():
        assert email.utils.parsedate_to_datetime(sent)


# -- kind 5: several challenges, realms with their own query -------------------------------

@pytest.mark.parametrize("shape", [
    lambda c: ['Basic realm="registry"', c],
    lambda c: [f'Basic realm="registry", {c}'],
    lambda c: [f'{c}, Basic realm="registry"'],
    lambda c: [c.replace("Bearer", "BEARER").replace("realm=", "Realm = ")],
    lambda c: ["Negotiate YII=", c.replace('service="fake"', "service=fake")],
    lambda c: [f'Newauth realm="x, y", type=1, {c}, Basic realm=r'],
], ids=["two-lines", "basic-first", "bearer-first", "upper-case-bws", "token68-unquoted", "unknown-scheme"])
async def test_kind5_several_challenges_get_a_bearer_token(mirror: Mirror, fake_registry: FakeRegistry, shape) -> None:  # type: ignore[no-untyped-def]
    fake_registry.require_auth = True
    fake_registry.www_authenticate = shape
    image = fake_registry.add_image("library/alpine", "3", 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200 and await resp.read() == image.body
    assert fake_registry.count(kind="token") == 1
    (token,) = fake_registry.tokens.values()
    assert token.requested == ("repository:library/alpine:pull",) and token.service == "fake"


async def test_kind5_a_realm_with_its_own_query_keeps_it(servers: Servers, mirror_for: MirrorFor) -> None:
    registry = FakeRegistry()
    registry.require_auth = True
    realm = TokenRealm(registry, query="account=ci&client_id=x%2Fy")
    realm.url = await servers.serve(realm.make_app())
    registry.token_realm = realm.realm
    url = registry.url = await servers.serve(registry.app)
    registry.add_image("library/alpine", "3", 1)
    mirror = await mirror_for(url)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    (asked,) = realm.requests
    assert asked.query.getall("account") == ["ci"] and asked.query.getall("client_id") == ["x/y"]
    assert asked.query.getall("scope") == ["repository:library/alpine:pull"]
    assert asked.query.getall("service") == ["fake"]


@pytest.mark.parametrize(("lines", "status"), [
    ([""], 401), (['"'], 401), (["Bearer"], 401), (["Bearer realm="], 401), (['Bearer realm="'], 401),
    (["Negotiate abc=="], 401), (['Bearer ="x", "Bearer" realm="x"'], 401), ([",,,"], 401), (['Bearer service="no realm"'], 401),
    (['Bearer realm="/relative/token"'], 502), (['Bearer realm=" "'], 502), (['Bearer realm="ftp://127.0.0.1/token"'], 502),
    (['Bearer realm="http://127.0.0.1:1/token"'], 503),
])
async def test_kind5_garbage_challenges_are_clean_failures(
    mirror: Mirror, fake_registry: FakeRegistry, lines: list[str], status: int
) -> None:
    fake_registry.require_auth = True
    fake_registry.www_authenticate = lambda _challenge: lines
    fake_registry.add_image("library/alpine", "3", 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == status
    assert (await resp.json())["errors"][0]["code"]
    assert fake_registry.count(kind="token") == 0
