"""Kind 1: redirect targets that ask for their own token (registry.k8s.io → a regional registry).

Every request (GET and HEAD; manifests, blobs, tags, `/v2/`) follows redirects, resolves
relative `Location`s against the URL that sent them, runs the token flow against whichever
origin challenges, and never shows one origin's token or credentials to another.
"""
from __future__ import annotations

import hashlib

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.config import UpstreamConfig
from mirror.metrics import Metrics
from mirror.upstream.authorizer import TokenCache
from mirror.upstream.client import Upstream
from mirror.upstream.redirects import MAX_REDIRECTS
from mirror.upstream.errors import UpstreamError
from mirror.upstream.ratelimit import RateLimits
from tests.credentials import FINGERPRINTS, creds
from tests.conftest import FakeClock
from tests.fakes.dialects import Dialect, Redirector, Servers, k8s
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT
from tests.upstream.conftest import MirrorFor


def upstream_at(url: str, username: str | None = None, password: str | None = None) -> Upstream:
    """An Upstream client named docker.io for `url`, on a fake clock."""
    metrics, clock = Metrics(), FakeClock()
    config = UpstreamConfig("docker.io", url, username=username, password=password, read_timeout=2.0)
    return Upstream(config, TokenCache(clock), RateLimits(metrics, clock), metrics, FINGERPRINTS)


def bearer_values(registry: FakeRegistry) -> list[str]:
    """The Bearer tokens `registry` was shown."""
    return [c.headers["Authorization"].removeprefix("Bearer ") for c in registry.requests
            if c.headers.get("Authorization", "").startswith("Bearer ")]


async def test_kind1_redirect_target_gets_its_own_token(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    regional, front = k8s_registry.registry, k8s_registry.front
    assert front is not None
    image = regional.add_image(k8s_registry.content_repo("coredns/coredns"), "v1", 2)
    mirror = await mirror_for(k8s_registry.url)

    resp = await mirror.client.get("/v2/coredns/coredns/manifests/v1", headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == image.body
    assert resp.headers["Docker-Content-Digest"] == image.digest
    for digest, layer in zip(image.layer_digests, image.layers):
        blob = await mirror.client.get(f"/v2/coredns/coredns/blobs/{digest}")
        assert blob.status == 200 and await blob.read() == layer
    config = await mirror.client.get(f"/v2/coredns/coredns/blobs/{image.config_digest}")
    assert config.status == 200 and await config.read() == image.config

    assert regional.count(kind="token") == 1, "one token from the regional realm serves every request"
    (token,) = regional.tokens.values()
    assert token.requested == ("repository:k8s-artifacts-prod/images/coredns/coredns:pull",)
    assert token.user is None
    assert all("Authorization" not in r.headers for r in front.requests), "the front never sees the token"
    assert set(bearer_values(regional)) == {token.value}


async def test_kind1_head_and_tags_and_base_follow_the_redirect(k8s_registry: Dialect) -> None:
    image = k8s_registry.registry.add_image(k8s_registry.content_repo("pause"), "3.9", 1)
    upstream = upstream_at(k8s_registry.url)
    try:
        head = await upstream.head_manifest("pause", "3.9", "*/*", None)
        assert (head.digest, head.body) == (image.digest, None)
        assert await upstream.head_blob("pause", image.layer_digests[0], None) == len(image.layers[0])
        body, _, _ = await upstream.get_tags("pause", "", None)
        assert b'"3.9"' in body
        await upstream.login(creds("someone", "secret"), ["pause"])  # nothing to check them against
    finally:
        await upstream.close()
    regional = k8s_registry.registry
    assert regional.count("HEAD", "manifest") == 3 and regional.count("GET", "manifest") == 0, \
        "a HEAD stays a HEAD on every hop: challenged, with the token, and the relative hop"
    assert regional.count(kind="token") == 1
    assert [r.path for r in regional.requests if r.kind == "base"] == ["/v2/"]
    shown = [r.headers["Authorization"] for r in regional.requests if "Authorization" in r.headers]
    assert shown and all(a.removeprefix("Bearer ") in regional.tokens for a in shown)


async def test_kind1_credentials_are_never_shown_to_the_redirect_target(k8s_registry: Dialect) -> None:
    """A service account configured for the front is for the front: the regional realm is asked anonymously."""
    regional = k8s_registry.registry
    image = regional.add_image(k8s_registry.content_repo("etcd"), "3", 1)
    upstream = upstream_at(k8s_registry.url, "svc", "hunter2")
    try:
        got = await upstream.get_manifest("etcd", "3", "*/*", upstream.service_account)
    finally:
        await upstream.close()
    assert got.body == image.body
    basic = creds("svc", "hunter2").basic
    assert all(r.headers.get("Authorization") != basic for r in regional.requests)
    assert [t.user for t in regional.tokens.values()] == [None]


class AuthedFront(FakeRegistry):
    """A registry with its own realm that, once a request's token is good, redirects every
    manifest request to `target` (another registry with another realm)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.require_auth = True
        self.target = target

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._away)
        return app

    @web.middleware
    async def _away(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name == "manifest":
            return web.Response(status=302, headers={"Location": self.target + request.path})
        return await handler(request)


async def test_kind1_each_origin_gets_only_the_token_it_issued(servers: Servers) -> None:
    other = FakeRegistry()
    other.require_auth = True
    other.url = await servers.serve(other.app)
    front = AuthedFront(other.url)
    front.url = await servers.serve(front.app)
    image = other.add_image("team/app", "1", 1)
    upstream = upstream_at(front.url)
    try:
        for _ in range(3):
            assert (await upstream.get_manifest("team/app", "1", "*/*", None)).body == image.body
    finally:
        await upstream.close()
    assert front.count(kind="token") == 1 and other.count(kind="token") == 1
    assert set(bearer_values(front)) <= set(front.tokens) and bearer_values(front)
    assert set(bearer_values(other)) <= set(other.tokens) and bearer_values(other)
    assert not set(front.tokens) & set(other.tokens)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_kind1_every_redirect_status_is_followed(servers: Servers, status: int, mirror_for: MirrorFor) -> None:
    dialect = await k8s(servers, status=status)
    image = dialect.registry.add_image(dialect.content_repo("k8s/kube-proxy"), "v1.30", 1)
    mirror = await mirror_for(dialect.url)
    resp = await mirror.client.get("/v2/k8s/kube-proxy/manifests/v1.30", headers=ACCEPT)
    assert resp.status == 200 and await resp.read() == image.body
    blob = await mirror.client.get(f"/v2/k8s/kube-proxy/blobs/{image.layer_digests[0]}")
    assert blob.status == 200 and await blob.read() == image.layers[0]


@pytest.mark.parametrize("form", ["absolute", "scheme-relative", "absolute-path", "dot-dot", "spaces"])
async def test_kind1_relative_locations_resolve_against_the_url_that_sent_them(
    k8s_registry: Dialect, form: str
) -> None:
    front, regional = k8s_registry.front, k8s_registry.registry
    assert front is not None and regional.url
    host = regional.url.removeprefix("http://")
    prefix = k8s_registry.prefix
    image = regional.add_image(prefix + "a/b", "1", 1)
    forms = {  # the front is asked for /v2/a/b/manifests/1
        "absolute": lambda r: f"{regional.url}/v2/{prefix}a/b/manifests/1",
        "scheme-relative": lambda r: f"//{host}/v2/{prefix}a/b/manifests/1",
        "absolute-path": lambda r: f"/v2/{prefix}a/b/manifests/1",  # on the front: a second hop below
        "dot-dot": lambda r: f"../../../{prefix}a/b/manifests/1",
        "spaces": lambda r: f"  {regional.url}/v2/{prefix}a/b/manifests/1 ",
    }
    first = forms[form]
    front.location = lambda r: first(r) if "/v2/a/" in r.path else f"{regional.url}{r.path_qs}"
    upstream = upstream_at(k8s_registry.url)
    try:
        got = await upstream.get_manifest("a/b", "1", "*/*", None)
    finally:
        await upstream.close()
    assert got.body == image.body


async def test_kind1_a_redirect_loop_is_a_clear_502(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    front = k8s_registry.front
    assert front is not None
    front.location = lambda r: r.path_qs  # back to itself
    mirror = await mirror_for(k8s_registry.url)
    resp = await mirror.client.get("/v2/coredns/coredns/manifests/v1", headers=ACCEPT)
    assert resp.status == 502
    error = (await resp.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "redirect loop" in error["message"]
    assert front.count() == 1, "a Location already visited is a loop: it is not asked again"


async def test_kind1_a_loop_between_two_hosts_is_a_loop(servers: Servers) -> None:
    first, second = Redirector("", status=302), Redirector("", status=307)
    first_url = await servers.serve(first.make_app())
    second_url = await servers.serve(second.make_app())
    first.location = lambda r: second_url + r.path_qs
    second.location = lambda r: first_url + r.path_qs
    upstream = upstream_at(first_url)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.head_manifest("a", "1", "*/*", None)
    finally:
        await upstream.close()
    assert caught.value.status == 502 and "redirect loop" in caught.value.message
    assert (first.count(), second.count()) == (1, 1)


async def test_kind1_redirects_are_bounded(servers: Servers) -> None:
    endless = Redirector("")
    url = await servers.serve(endless.make_app())
    endless.location = lambda r: f"{url}/v2/a/manifests/1?n={int(r.query.get('n', '0')) + 1}"
    upstream = upstream_at(url)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.get_manifest("a", "1", "*/*", None)
    finally:
        await upstream.close()
    assert caught.value.status == 502 and f"more than {MAX_REDIRECTS} redirects" in caught.value.message
    assert endless.count() == MAX_REDIRECTS + 1
    assert "n=" not in caught.value.message, "queries (signatures) stay out of messages"


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/x", "http://", "mailto:a@b", "http://[::1"])
async def test_kind1_an_unusable_location_is_a_502(k8s_registry: Dialect, location: str) -> None:
    assert k8s_registry.front is not None
    k8s_registry.front.location = lambda r: location
    upstream = upstream_at(k8s_registry.url)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.head_manifest("a", "1", "*/*", None)
    finally:
        await upstream.close()
    assert caught.value.status == 502


async def test_kind1_unknown_tag_on_the_redirect_target_is_404(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    """The regional registry speaks the registry API: its 404 is upstream's word, not a storage failure."""
    mirror = await mirror_for(k8s_registry.url)
    resp = await mirror.client.get("/v2/coredns/coredns/manifests/nope", headers=ACCEPT)
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"  # the repository exists; the tag does not


async def test_kind1_by_digest_cold_and_warm(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    image = k8s_registry.registry.add_image(k8s_registry.content_repo("coredns/coredns"), "v1", 1)
    mirror = await mirror_for(k8s_registry.url)
    regional = k8s_registry.registry
    for gets in (3, 3):  # cold: challenged, with the token, the relative hop; warm: from the cache
        resp = await mirror.client.get(f"/v2/coredns/coredns/manifests/{image.digest}", headers=ACCEPT)
        assert resp.status == 200
        assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == image.digest
        assert regional.count("GET", "manifest") == gets


class DownloadPath(FakeRegistry):
    """A registry that sends blob GETs to `/download/<digest>` on its own origin, where the
    token of the repository is required again (as Go clients keep it on same-host redirects)."""

    def __init__(self) -> None:
        super().__init__()
        self.require_auth = True
        self.download_auth: list[str | None] = []

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._to_download)
        app.router.add_get("/download/{digest}", self._download)
        return app

    @web.middleware
    async def _to_download(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name == "blob" and request.method == "GET":
            return web.Response(status=307, headers={"Location": f"/download/{request.match_info['digest']}"})
        return await handler(request)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        self.download_auth.append(authorization)
        token = self.tokens.get((authorization or "").removeprefix("Bearer "))
        if token is None:
            return web.Response(status=401)
        for name in token.granted:
            if (data := self.repos[name].blobs.get(request.match_info["digest"])) is not None:
                return web.Response(body=data)
        return web.Response(status=404)


async def test_kind1_a_download_path_on_the_same_origin_keeps_the_token(servers: Servers) -> None:
    registry = DownloadPath()
    url = await servers.serve(registry.app)
    image = registry.add_image("team/app", "1", 1)
    upstream = upstream_at(url)
    try:
        resp = await upstream.open_blob("team/app", image.layer_digests[0], None)
        async with resp:
            assert await resp.read() == image.layers[0]
    finally:
        await upstream.close()
    (token,) = registry.tokens
    assert registry.download_auth == [f"Bearer {token}"]
    assert registry.count(kind="token") == 1


async def test_kind1_tags_list_through_the_mirror_follows_the_redirect(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    regional = k8s_registry.registry
    image = regional.add_image(k8s_registry.content_repo("coredns/coredns"), "v1", 1)
    regional.set_tag(k8s_registry.content_repo("coredns/coredns"), "v1.1", image.digest)
    mirror = await mirror_for(k8s_registry.url)
    resp = await mirror.client.get("/v2/coredns/coredns/tags/list")
    assert resp.status == 200
    assert (await resp.json())["tags"] == ["v1", "v1.1"]
    assert regional.count(kind="token") == 1


async def test_kind6_tag_pages_through_a_redirect_stay_on_the_mirror(k8s_registry: Dialect, mirror_for: MirrorFor) -> None:
    """The regional host's `Link` names the repository its own way; the client still gets the
    mirror's route and every page, in order."""
    regional, repo = k8s_registry.registry, k8s_registry.content_repo("coredns/coredns")
    image = regional.add_image(repo, "v1", 1)
    for tag in ("v2", "v3", "v4", "v5"):
        regional.set_tag(repo, tag, image.digest)
    mirror = await mirror_for(k8s_registry.url)
    seen, url = [], "/v2/coredns/coredns/tags/list?n=2"
    while url:
        resp = await mirror.client.get(url)
        assert resp.status == 200, await resp.text()
        seen += (await resp.json())["tags"]
        link = resp.headers.get("Link")
        url = link[1:link.index(">")] if link else ""
        assert not url or url.startswith("/v2/coredns/coredns/tags/list?"), link
    assert seen == ["v1", "v2", "v3", "v4", "v5"]
