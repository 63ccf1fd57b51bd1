"""Realm binding: credentials go only to token realms on the upstream's host or in its
`token_realms`, over https unless the upstream is plain http; anonymous token requests go anywhere.

The flow is tested twice: the authorizer alone with a recording transport (no sockets), and the
whole mirror against a Docker Hub-like upstream whose realm is on another host (127.0.0.2),
counting at that realm every request that carried a credential.
"""
from __future__ import annotations

from typing import Mapping

import pytest

from mirror.config import ConfigError, load, parse_token_realms
from mirror.metrics import Metrics
from mirror.upstream.authorizer import Authorizer, RealmBinding, TokenCache, TokenKey, TokenReply
from mirror.upstream.errors import UpstreamError
from mirror.upstream.ratelimit import RateLimits
from tests.conftest import FakeClock
from tests.credentials import creds
from tests.fakes.dialects import REALM_HOST, Dialect
from tests.proxy.test_manifests import ACCEPT
from tests.upstream.conftest import MirrorFor

ALICE = creds("alice", "alice-pw")


# -- the binding, alone ------------------------------------------------------------------

@pytest.mark.parametrize("realm, trusted", [
    ("https://registry.example/token", True),  # the upstream's own host ...
    ("https://registry.example:8443/token", True),  # ... at any port
    ("https://REGISTRY.example/token", True),
    ("https://auth.example/token", True),  # listed as a host: any port
    ("https://auth.example:444/token", True),
    ("https://sso.example:8443/token", True),  # listed as host:port
    ("https://sso.example/token", False),  # ... that port only
    ("https://sso.example:9443/token", False),
    ("https://evil.example/token", False),
    ("https://registry.example.evil.example/token", False),
    ("https://example/token", False),
    ("http://registry.example/token", False),  # plain http, the upstream being https
    ("http://auth.example/token", False),
])
def test_credentials_go_only_to_trusted_realms_over_https(realm: str, trusted: bool) -> None:
    binding = RealmBinding("hub", "https://registry.example", ("auth.example", "sso.example:8443"))
    assert (binding.refusal(realm) is None) is trusted


def test_a_plain_http_upstream_may_use_a_plain_http_realm_on_its_own_host() -> None:
    binding = RealmBinding("lab", "http://127.0.0.1:5000", ())
    assert binding.refusal("http://127.0.0.1:5001/token") is None
    assert binding.refusal("http://127.0.0.2:5001/token") is not None


def test_a_refusal_names_the_realm_and_the_setting_that_allows_it() -> None:
    why = RealmBinding("docker.io", "https://registry-1.docker.io", ("auth.docker.io",)).refusal(
        "https://collector.example/token?x=secret")
    assert why is not None
    assert "https://collector.example/token" in why and "secret" not in why
    assert 'upstreams."docker.io".token_realms' in why and "auth.docker.io" in why


# -- the authorizer, without sockets -------------------------------------------------------

class Realm:
    """Records what would be sent to token realms and answers with a token."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, url: str, headers: Mapping[str, str]) -> TokenReply:
        self.sent.append((url, dict(headers)))
        return TokenReply(200, {}, b'{"token": "t0k3n", "expires_in": 300}')


def authorizer(realm: Realm, url: str = "https://registry.example", token_realms: tuple[str, ...] = ()) -> Authorizer:
    clock = FakeClock()
    return Authorizer(RealmBinding("hub", url, token_realms), TokenCache(clock), RateLimits(Metrics(), clock), realm)


KEY = TokenKey("hub", "https://registry.example:443", "repository:a:pull", ALICE.fingerprint)


async def test_a_foreign_realm_gets_no_credentials_but_a_clear_502() -> None:
    realm = Realm()
    with pytest.raises(UpstreamError) as refused:
        await authorizer(realm).answer(['Bearer realm="https://evil.example/token",service="x"'], KEY, ALICE)
    assert refused.value.status == 502
    assert "credentials not sent" in refused.value.message and "https://evil.example/token" in refused.value.message
    assert "token_realms" in refused.value.message
    assert realm.sent == []


async def test_anonymous_token_requests_may_go_to_any_realm() -> None:
    realm = Realm()
    got = await authorizer(realm).answer(['Bearer realm="https://elsewhere.example/token"'], KEY, None)
    assert got == "Bearer t0k3n"
    assert realm.sent == [("https://elsewhere.example/token?scope=repository%3Aa%3Apull", {})]


async def test_a_listed_realm_gets_the_credentials() -> None:
    realm = Realm()
    auth = authorizer(realm, token_realms=("auth.example",))
    assert await auth.answer(['Bearer realm="https://auth.example/token"'], KEY, ALICE) == "Bearer t0k3n"
    assert realm.sent[0][1] == {"Authorization": ALICE.basic}
    assert auth.cached(KEY) == "Bearer t0k3n"


@pytest.mark.parametrize("realm_url", [
    "https://user:pw@registry.example/token", "https://registry.example/token#x", "ftp://registry.example/token",
    "https://registry.example:0x1/token", "/token",
])
@pytest.mark.parametrize("who", [ALICE, None], ids=["credentials", "anonymous"])
async def test_an_unusable_realm_is_a_502_and_nothing_is_sent(realm_url: str, who: object) -> None:
    realm = Realm()
    with pytest.raises(UpstreamError) as refused:
        await authorizer(realm).answer([f'Bearer realm="{realm_url}"'], KEY, who)  # type: ignore[arg-type]
    assert refused.value.status == 502 and "nothing was sent" in refused.value.message
    assert realm.sent == []


async def test_basic_challenges_get_the_credentials_of_the_origin_that_asked_only() -> None:
    realm = Realm()
    assert await authorizer(realm).answer(['Basic realm="registry"'], KEY, ALICE) == ALICE.basic
    assert await authorizer(realm).answer(['Basic realm="registry"'], KEY, None) is None
    assert realm.sent == []


# -- configuration -------------------------------------------------------------------------

def test_token_realms_accepts_hosts_and_host_ports() -> None:
    assert parse_token_realms(["Auth.Example", "sso.example:8443", "[::1]:5001"]) == (
        "auth.example", "sso.example:8443", "[::1]:5001")


@pytest.mark.parametrize("entry", [
    "https://auth.example", "auth.example/token", "user@auth.example", "auth.example:0", "auth.example:99999",
    "auth.example:x", "auth.example#f", "auth.example?q", "", ":443",
])
def test_token_realms_refuses_anything_but_a_host(entry: str) -> None:
    with pytest.raises(ValueError, match="host or host:port"):
        parse_token_realms([entry])


def test_token_realms_in_a_file_and_the_built_in_docker_hub(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert load().upstreams["docker.io"].token_realms == ("auth.docker.io",)
    assert load().upstreams["ghcr.io"].token_realms == ()
    path = tmp_path / "m.toml"
    path.write_text('[upstreams."docker.io"]\nurl = "https://registry-1.docker.io"\n'
                    '[upstreams.corp]\nurl = "https://registry.corp"\ntoken_realms = ["sso.corp:8443"]\n'
                    '[server]\ndefault_upstream = "corp"\n')
    cfg = load(str(path))
    assert cfg.upstreams["docker.io"].token_realms == ("auth.docker.io",)  # the registry's, whatever its name
    assert cfg.upstreams["corp"].token_realms == ("sso.corp:8443",)
    path.write_text('[upstreams.corp]\nurl = "https://registry.corp"\ntoken_realms = "sso.corp"\n')
    with pytest.raises(ConfigError, match="upstreams.corp.token_realms"):
        load(str(path))


# -- the whole mirror, every kind of credential -------------------------------------------

def with_credentials(realm_requests: list) -> int:  # type: ignore[type-arg]
    return sum(1 for seen in realm_requests if "Authorization" in seen.headers)


async def test_no_kind_of_credential_reaches_a_foreign_realm(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    hub.registry.users = {"alice": "alice-pw", "svc": "svc-pw"}
    hub.registry.add_image("library/alpine", "3", 1)
    path = "/v2/library/alpine/manifests/3"

    client_basic = await mirror_for(hub.url)
    resp = await client_basic.client.get(path, headers={**ACCEPT, "Authorization": ALICE.basic})
    assert resp.status == 502
    error = (await resp.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and REALM_HOST in error["message"] and "token_realms" in error["message"]

    for form in ({"params": {"scope": "repository:library/alpine:pull"}, "headers": {"Authorization": ALICE.basic}},):
        resp = await client_basic.client.get("/token", **form)
        assert resp.status == 502, "the token form: the login is refused, not downgraded"
    resp = await client_basic.client.post("/token", data={
        "grant_type": "password", "username": "alice", "password": "alice-pw", "service": "mirror",
        "scope": "repository:library/alpine:pull"})
    assert resp.status == 502

    service_account = await mirror_for(hub.url, username="svc", password="svc-pw")
    resp = await service_account.client.get(path, headers=ACCEPT)
    assert resp.status == 502

    assert with_credentials(hub.realm.requests) == 0

    anonymous = await mirror_for(hub.url)
    assert (await anonymous.client.get(path, headers=ACCEPT)).status == 200
    assert len(hub.realm.requests) >= 1 and with_credentials(hub.realm.requests) == 0


async def test_a_listed_realm_receives_the_credentials_and_pulls_work(hub: Dialect, mirror_for: MirrorFor) -> None:
    assert hub.realm is not None
    hub.registry.users = {"alice": "alice-pw"}
    hub.registry.private = {"team/app": {"alice"}}
    hub.registry.add_image("team/app", "1", 1)
    mirror = await mirror_for(hub.url, token_realms=(REALM_HOST,))
    resp = await mirror.client.get("/v2/team/app/manifests/1", headers={**ACCEPT, "Authorization": ALICE.basic})
    assert resp.status == 200
    assert with_credentials(hub.realm.requests) >= 1
