"""Tag lists: passthrough with a short per-principal cache, and pagination that stays on the mirror (kind 6)."""
from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from mirror.proxy.tags import FRESH_FOR, Page, mirror_link, next_page
from tests.conftest import Mirror, mirror_with_ghcr
from tests.fakes.registry import FakeRegistry

UP = "https://ghcr.example:8443"
LIST = f"{UP}/v2/org/app/tags/list"  # the tag list that carried the Link


@pytest.fixture
async def two(fake_registry: FakeRegistry, ghcr: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    """The mirror with docker.io (the default, `fake_registry`) and ghcr.io (`ghcr`)."""
    return await mirror_with_ghcr(fake_registry, ghcr, tmp_path, aiohttp_client)


def _tags(registry: FakeRegistry, repo: str, *tags: str) -> None:
    image = registry.add_image(repo, None, 1)
    for tag in tags:
        registry.set_tag(repo, tag, image.digest)


async def _page(mirror: Mirror, url: str | URL) -> tuple[list[str], str | None]:
    resp = await mirror.client.get(url)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["tags"], resp.headers.get("Link")


def _query(raw: str) -> dict[str, str]:
    """A query string as sent (percent-encoded), decoded."""
    return dict(URL(f"http://upstream/?{raw}").query)


def _target(link: str | None) -> URL:
    assert link is not None and link.startswith("<") and link.endswith('>; rel="next"'), link
    return URL(link[1:link.index(">")])


# ---- the Link a client gets -----------------------------------------------------------------

async def test_kind6_link_keeps_the_ghcr_prefix(two: Mirror, fake_registry: FakeRegistry, ghcr: FakeRegistry) -> None:
    _tags(ghcr, "org/app", "a", "b", "c", "d", "e")
    _tags(fake_registry, "org/app", "docker-only")
    tags, link = await _page(two, "/v2/ghcr.io/org/app/tags/list?n=2")
    assert (tags, link) == (["a", "b"], '</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel="next"')
    tags, link = await _page(two, _target(link))
    assert (tags, link) == (["c", "d"], '</v2/ghcr.io/org/app/tags/list?n=2&last=d>; rel="next"')
    tags, link = await _page(two, _target(link))
    assert (tags, link) == (["e"], None)
    assert ghcr.count("GET", "tags") == 3
    assert fake_registry.count(kind="tags") == 0


async def test_kind6_link_keeps_the_ns(two: Mirror, fake_registry: FakeRegistry, ghcr: FakeRegistry) -> None:
    _tags(ghcr, "org/app", "a", "b", "c")
    tags, link = await _page(two, "/v2/org/app/tags/list?ns=ghcr.io&n=2")
    assert (tags, link) == (["a", "b"], '</v2/org/app/tags/list?n=2&last=b&ns=ghcr.io>; rel="next"')
    tags, link = await _page(two, _target(link))
    assert (tags, link) == (["c"], None)
    assert ghcr.count("GET", "tags") == 2 and fake_registry.count(kind="tags") == 0


async def test_kind6_link_keeps_override_path_prefix_and_ns(two: Mirror, ghcr: FakeRegistry) -> None:
    _tags(ghcr, "org/app", "a", "b", "c")
    tags, link = await _page(two, "/v2/ghcr.io/org/app/tags/list?ns=ghcr.io&n=1")
    assert (tags, link) == (["a"], '</v2/ghcr.io/org/app/tags/list?n=1&last=a&ns=ghcr.io>; rel="next"')


async def test_kind6_default_upstream_link_uses_the_name_as_the_client_wrote_it(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    _tags(fake_registry, "library/alpine", "3.18", "3.19", "3.20")
    tags, link = await _page(mirror, "/v2/alpine/tags/list?n=2")
    assert (tags, link) == (["3.18", "3.19"], '</v2/alpine/tags/list?n=2&last=3.19>; rel="next"')
    assert fake_registry.requests[-1].path == "/v2/library/alpine/tags/list"


@pytest.mark.parametrize("last", ["a&b", "x=y", "1+2", "sp ace", "100%", "a/é", "a;b,c", "n=9&last=z"])
async def test_kind6_last_is_escaped_both_ways(two: Mirror, ghcr: FakeRegistry, last: str) -> None:
    """The client's `last` reaches upstream as one value; upstream's reaches the client's next request intact."""
    ghcr.tags_link = lambda repo, _last, n: (
        f'<{URL.build(path=f"/v2/{repo}/tags/list", query={"last": last, "n": n})}>; rel="next"')
    _tags(ghcr, "org/app", "zz1", "zz2", "zz3")
    resp = await two.client.get(URL.build(path="/v2/ghcr.io/org/app/tags/list", query={"n": "1", "last": last}))
    assert resp.status == 200
    sent = ghcr.requests[-1]
    assert (sent.kind, sent.path) == ("tags", "/v2/org/app/tags/list")
    assert _query(sent.query) == {"n": "1", "last": last}
    link = _target(resp.headers.get("Link"))
    assert link.path == "/v2/ghcr.io/org/app/tags/list"
    assert dict(link.query) == {"n": "1", "last": last}
    assert (await two.client.get(link)).status == 200
    assert _query(ghcr.requests[-1].query) == {"n": "1", "last": last}


async def test_kind6_client_query_goes_upstream_encoded(two: Mirror, ghcr: FakeRegistry) -> None:
    _tags(ghcr, "org/app", "a&n=9", "b", "c")
    resp = await two.client.get(URL.build(path="/v2/ghcr.io/org/app/tags/list", query={"last": "a&n=9", "n": "1"}))
    assert resp.status == 200
    assert (await resp.json())["tags"] == ["b"]
    assert ghcr.requests[-1].query == "n=1&last=a%26n%3D9"


async def test_kind6_ns_is_not_sent_upstream(two: Mirror, ghcr: FakeRegistry) -> None:
    _tags(ghcr, "org/app", "a")
    assert (await _page(two, "/v2/org/app/tags/list?ns=ghcr.io"))[0] == ["a"]
    assert ghcr.requests[-1].query == ""


# ---- every form upstream sends ----------------------------------------------------------------

@pytest.mark.parametrize("link", [
    '</v2/org/app/tags/list?last=b&n=2>; rel="next"',  # distribution
    "</v2/org/app/tags/list?last=b&n=2>",  # quay.io: no rel
    "</v2/org/app/tags/list?n=2&last=b>;rel=next",
    '<{up}/v2/org/app/tags/list?last=b&n=2>; rel="next"',  # absolute, upstream's own origin
    '<{up}/v2/org/app/tags/list?last=b&n=2>; rel="Next"',
    '<list?last=b&n=2>; rel="next"',  # relative to the request's own path
    '</v2/org/app/tags/list?last=b&n=2&foo>; rel="next"; title="page 2"',
])
def test_kind6_next_page_forms(link: str) -> None:
    page = next_page(link.format(up=UP), LIST)
    assert page is not None and (page.n, page.last) == (2, "b")


def test_kind6_next_page_keeps_continuation_parameters() -> None:
    link = f"<{UP}/v2/org/app/tags/list?n=50&next_page=abc%3D%3D>"
    page = next_page(link, LIST)
    assert page == Page(50, None, (("next_page", "abc=="),))
    assert mirror_link("quay.io/org/app", None, page) == '</v2/quay.io/org/app/tags/list?n=50&next_page=abc%3D%3D>; rel="next"'


@pytest.mark.parametrize("link", [
    '<https://evil.example/v2/org/app/tags/list?last=b&n=2>; rel="next"',  # another host
    '<http://ghcr.example:8443/v2/org/app/tags/list?last=b&n=2>; rel="next"',  # another scheme
    '<https://ghcr.example/v2/org/app/tags/list?last=b&n=2>; rel="next"',  # another port
    '<//evil.example/v2/org/app/tags/list?last=b>; rel="next"',  # scheme-relative
    '<javascript:alert(1)>; rel="next"',
    '<file:///etc/passwd>; rel="next"',
    '</v2/org/other/tags/list?last=b&n=2>; rel="next"',  # another repository
    '</v2/org/app/tags/list/../../other/tags/list?last=b>; rel="next"',
    '</v2/org/app/manifests/latest?last=b>; rel="next"',  # another endpoint
    '</v2/_catalog?last=b>; rel="next"',
    '</v2/org/app/tags/list?last=b&n=2>; rel="prev"',
    '</v2/org/app/tags/list?n=2>; rel="next"',  # no way forward: the same page again
    '</v2/org/app/tags/list?n=abc&last=b>; rel="next"',
    '</v2/org/app/tags/list?n=-1&last=b>; rel="next"',
    '</v2/org/app/tags/list?last=' + "x" * 5000 + '>; rel="next"',
    "</v2/org/app/tags/list?last=b",
    "garbage", "", "<>", '<>; rel="next"', "<<<>>>", ";;;", "<http://[::1>; rel=next", '<http://%zz/>; rel="next"',
])
def test_kind6_link_elsewhere_or_garbage_is_dropped(link: str) -> None:
    assert next_page(link, LIST) is None


@pytest.mark.parametrize("link", [
    '<https://evil.example/v2/org/app/tags/list?last=b&n=2>; rel="next"',
    '</v2/library/other/tags/list?last=b&n=2>; rel="next"',
    "total garbage",
])
async def test_kind6_link_elsewhere_is_not_relayed_or_followed(
        mirror: Mirror, fake_registry: FakeRegistry, link: str) -> None:
    _tags(fake_registry, "library/app", "a", "b", "c")
    fake_registry.tags_link = lambda repo, last, n: link
    tags, got = await _page(mirror, "/v2/library/app/tags/list?n=1")
    assert (tags, got) == (["a"], None)
    assert fake_registry.count(kind="tags") == 1
    assert [c.path for c in fake_registry.requests] == ["/v2/library/app/tags/list"]


@pytest.mark.parametrize("form", ["relative", "absolute", "bare"])
async def test_kind6_every_upstream_form_is_rewritten_to_the_route(
        two: Mirror, fake_registry: FakeRegistry, ghcr: FakeRegistry, form: str) -> None:
    assert ghcr.url
    base = {"relative": "", "absolute": ghcr.url, "bare": ""}[form]
    rel = "" if form == "bare" else '; rel="next"'
    ghcr.tags_link = lambda repo, last, n: f'<{base}{URL.build(path=f"/v2/{repo}/tags/list", query={"last": last, "n": n, "x": "1"})}>{rel}'
    _tags(ghcr, "org/app", "a", "b")
    _, link = await _page(two, "/v2/org/app/tags/list?n=1&ns=ghcr.io")
    assert link == '</v2/org/app/tags/list?n=1&last=a&x=1&ns=ghcr.io>; rel="next"'
    tags, link = await _page(two, _target(link))
    assert (tags, link) == (["b"], None)
    assert fake_registry.count(kind="tags") == 0


# ---- bad paging input -------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["n=abc", "n=-1", "n=1e3", "n=99999999", "n=%C2%B9", "last=" + "x" * 2000])
async def test_kind6_bad_paging_is_400(mirror: Mirror, fake_registry: FakeRegistry, query: str) -> None:
    resp = await mirror.client.get(f"/v2/library/app/tags/list?{query}")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    assert fake_registry.requests == []


# ---- the cache --------------------------------------------------------------------------------

async def test_tag_list_cache_is_per_principal_and_per_page(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    _tags(fake_registry, "library/app", "a", "b", "c")
    for _ in range(2):
        assert (await _page(mirror, "/v2/library/app/tags/list?n=1"))[0] == ["a"]
    assert fake_registry.count(kind="tags") == 1
    assert (await _page(mirror, "/v2/library/app/tags/list?n=2"))[0] == ["a", "b"]
    assert fake_registry.count(kind="tags") == 2
    resp = await mirror.client.get("/v2/library/app/tags/list?n=1", headers={"Authorization": aiohttp.encode_basic_auth("u", "p")})
    assert resp.status == 200
    assert fake_registry.count(kind="tags") == 3  # another principal: its own upstream request
    mirror.clock.advance(FRESH_FOR + 1)
    fake_registry.fail_status = 503
    tags, link = await _page(mirror, "/v2/library/app/tags/list?n=1")
    assert (tags, link) == (["a"], '</v2/library/app/tags/list?n=1&last=a>; rel="next"')  # stale, Link still rewritten


async def test_tag_list_body_passes_through(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    _tags(fake_registry, "library/app", "v1")
    resp = await mirror.client.get("/v2/app/tags/list")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert json.loads(await resp.read()) == {"name": "library/app", "tags": ["v1"]}
    assert "Link" not in resp.headers
