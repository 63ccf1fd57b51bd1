"""Passthrough auth and the access policy: who may read what, through the mirror's token realm."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from mirror.app import make_app
from tests.conftest import TAG_TTL, FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry, Image
from tests.proxy.test_manifests import ACCEPT

USERS = {"alice": "alice-pw", "bob": "bob-pw", "svc": "svc-pw"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def login(mirror: Mirror, user: str, password: str, repo: str) -> dict[str, str]:
    resp = await mirror.client.get("/token", params={"service": "mirror", "scope": f"repository:{repo}:pull"},
                                   headers=basic(user, password))
    assert resp.status == 200, await resp.text()
    return {"Authorization": f"Bearer {(await resp.json())['token']}"}


@pytest.fixture
def private_image(fake_registry: FakeRegistry) -> Image:
    fake_registry.require_auth = True
    fake_registry.users = dict(USERS)
    fake_registry.private = {"library/secret": {"alice", "svc"}}
    return fake_registry.add_image("library/secret", "1", 2)


def paths(image: Image, repo: str = "library/secret") -> list[str]:
    return [f"/v2/{repo}/manifests/1", f"/v2/{repo}/manifests/{image.digest}",
            *(f"/v2/{repo}/blobs/{d}" for d in (image.config_digest, *image.layer_digests))]


async def test_version_check_challenges_with_the_mirrors_realm(mirror: Mirror) -> None:
    resp = await mirror.client.get("/v2/")
    assert resp.status == 401
    challenge = resp.headers["WWW-Authenticate"]
    assert re.fullmatch(r'Bearer realm="http://127\.0\.0\.1:\d+/token",service="mirror"', challenge), challenge
    anonymous = await (await mirror.client.get("/token", params={"service": "mirror"})).json()
    resp = await mirror.client.get("/v2/", headers={"Authorization": f"Bearer {anonymous['token']}"})
    assert resp.status == 200


async def test_private_image_pulls_with_the_clients_own_credentials(
    mirror: Mirror, fake_registry: FakeRegistry, private_image: Image
) -> None:
    auth = await login(mirror, "alice", "alice-pw", "library/secret")
    for path in paths(private_image):
        resp = await mirror.client.get(path, headers={**ACCEPT, **auth})
        assert resp.status == 200, path
    users = {t.user for t in fake_registry.tokens.values()}
    assert users == {"alice"}, "upstream saw someone other than the client"


async def test_wrong_password_is_refused_with_upstreams_reason(mirror: Mirror, private_image: Image) -> None:
    resp = await mirror.client.get("/token", params={"scope": "repository:library/secret:pull"},
                                   headers=basic("alice", "wrong"))
    assert resp.status == 401
    assert "incorrect username or password" in (await resp.json())["errors"][0]["message"]


async def test_cached_private_content_is_refused_to_others(
    mirror: Mirror, fake_registry: FakeRegistry, private_image: Image
) -> None:
    fake_registry.add_image("library/public", "1", 1)
    auth = await login(mirror, "alice", "alice-pw", "library/secret")
    for path in paths(private_image):
        assert (await mirror.client.get(path, headers={**ACCEPT, **auth})).status == 200
    anonymous = {"Authorization": f"Bearer {(await (await mirror.client.get('/token')).json())['token']}"}
    bob = await login(mirror, "bob", "bob-pw", "library/secret")
    # anonymous clients are challenged (401), refused credentials denied (403), and the private
    # content asked for through the public repository is not there (404) for whoever may read that
    for who, headers, in_secret, in_public in (
            ("nobody", {}, 401, 404), ("anonymous", anonymous, 401, 404), ("bob", bob, 403, 404),
            ("bob-basic", basic("bob", "bob-pw"), 403, 404), ("wrong-basic", basic("alice", "nope"), 403, 403)):
        for path, status in [(p, in_secret) for p in paths(private_image)] + [
                (p, in_public) for p in paths(private_image, "library/public")[1:]]:
            resp = await mirror.client.get(path, headers={**ACCEPT, **headers})
            assert resp.status == status, (who, path, resp.status)
            unknown = "MANIFEST_UNKNOWN" if "/manifests/" in path else "BLOB_UNKNOWN"
            code = {401: "UNAUTHORIZED", 403: "DENIED"}.get(status, unknown)
            assert (await resp.json())["errors"][0]["code"] == code, (who, path)
            if resp.status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer realm=")


async def test_basic_credentials_sent_to_v2_are_passed_through(
    mirror: Mirror, fake_registry: FakeRegistry, private_image: Image
) -> None:
    for path in paths(private_image):
        assert (await mirror.client.get(path, headers={**ACCEPT, **basic("alice", "alice-pw")})).status == 200


async def test_stale_tag_is_not_served_to_a_principal_upstream_now_refuses(
    mirror: Mirror, fake_registry: FakeRegistry, private_image: Image
) -> None:
    auth = basic("alice", "alice-pw")
    assert (await mirror.client.get("/v2/library/secret/manifests/1", headers={**ACCEPT, **auth})).status == 200
    fake_registry.private["library/secret"] = {"svc"}
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/secret/manifests/1", headers={**ACCEPT, **auth})
    # refused either way; `access.denied` would say 403 DENIED for refused credentials, but a
    # revalidation made with the client's own credentials relays upstream's 401 as it came
    assert resp.status in (401, 403)
    assert (await resp.json())["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")


async def test_oauth_password_grant_and_refresh(mirror: Mirror, private_image: Image) -> None:
    form = {"grant_type": "password", "username": "alice", "password": "alice-pw", "service": "mirror",
            "scope": "repository:library/secret:pull", "access_type": "offline", "client_id": "containerd"}
    body = await (await mirror.client.post("/token", data=form)).json()
    assert body["access_token"] and body["refresh_token"]
    refreshed = await mirror.client.post("/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    auth = {"Authorization": f"Bearer {(await refreshed.json())['access_token']}"}
    assert (await mirror.client.get("/v2/library/secret/manifests/1", headers={**ACCEPT, **auth})).status == 200
    bad = await mirror.client.post("/token", data={**form, "password": "wrong"})
    assert bad.status == 401
    assert (await mirror.client.post("/token", data={"grant_type": "client_credentials"})).status == 400


@pytest.mark.parametrize("header", [
    "Bearer not-a-token-of-ours", "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode(),
    "Negotiate abc", "Bearer", "garbage",
])
async def test_bad_authorization_gets_401_with_an_oci_body(mirror: Mirror, fake_registry: FakeRegistry, header: str) -> None:
    fake_registry.add_image("library/public", "1", 1)
    resp = await mirror.client.get("/v2/library/public/manifests/1", headers={**ACCEPT, "Authorization": header})
    assert resp.status == 401
    assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert fake_registry.count(kind="manifest") == 0


async def test_mirror_tokens_expire(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/public", "1", 1)
    token = (await (await mirror.client.get("/token")).json())["token"]
    mirror.clock.advance(3600)
    resp = await mirror.client.get("/v2/library/public/manifests/1", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401


async def _mirror_with(aiohttp_client, fake_registry: FakeRegistry, tmp_path: Path, **upstream: object) -> Mirror:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", **upstream), clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")


async def test_service_account_pulls_for_anonymous_clients_without_leaking(
    aiohttp_client, fake_registry: FakeRegistry, private_image: Image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    mirror = await _mirror_with(aiohttp_client, fake_registry, tmp_path, username="svc", password="svc-pw")
    public = fake_registry.add_image("library/public", "1", 1)
    for path in paths(public, "library/public"):
        assert (await mirror.client.get(path, headers=ACCEPT)).status == 200, path
    assert {t.user for t in fake_registry.tokens.values() if "library/public" in t.granted} >= {"svc"}
    # the account can read the private repository; an anonymous client still may not
    for path in paths(private_image):
        assert (await mirror.client.get(path, headers=ACCEPT)).status == 401, path


async def test_share_with_anonymous_is_the_operators_explicit_opt_out(
    aiohttp_client, fake_registry: FakeRegistry, private_image: Image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    mirror = await _mirror_with(aiohttp_client, fake_registry, tmp_path, share_with_anonymous=True)
    for path in paths(private_image):
        assert (await mirror.client.get(path, headers={**ACCEPT, **basic("alice", "alice-pw")})).status == 200
    for path in paths(private_image):
        assert (await mirror.client.get(path, headers=ACCEPT)).status == 200, path
