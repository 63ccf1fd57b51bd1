"""`/v2/_catalog`: the cached repositories the caller may read, named as the client addresses them, paginated."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Mirror, mirror_with_ghcr
from tests.fakes.registry import FakeRegistry

ALICE = {"Authorization": aiohttp.encode_basic_auth("alice", "secret")}


async def _pull(mirror: Mirror, name: str, headers: dict[str, str] | None = None) -> None:
    resp = await mirror.client.get(f"/v2/{name}/manifests/v1", headers=headers or {})
    assert resp.status == 200, await resp.text()


async def _catalog(mirror: Mirror, query: str = "", headers: dict[str, str] | None = None) -> tuple[list[str], str | None]:
    resp = await mirror.client.get(f"/v2/_catalog{query}", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    return (await resp.json())["repositories"], resp.headers.get("Link")


async def test_kind12_catalog_lists_cached_repositories_as_clients_name_them(
        fake_registry: FakeRegistry, ghcr: FakeRegistry, tmp_path: Path, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    mirror = await mirror_with_ghcr(fake_registry, ghcr, tmp_path, aiohttp_client)
    fake_registry.add_image("library/alpine", "v1", 1)
    fake_registry.add_image("bitnami/redis", "v1", 1)
    fake_registry.add_image("library/never-pulled", "v1", 1)
    ghcr.add_image("org/app", "v1", 1)
    await _pull(mirror, "alpine")
    await _pull(mirror, "bitnami/redis")
    await _pull(mirror, "ghcr.io/org/app")
    fake_registry.reset_counts()
    ghcr.reset_counts()
    assert await _catalog(mirror) == (["bitnami/redis", "ghcr.io/org/app", "library/alpine"], None)
    assert fake_registry.requests == [] and ghcr.requests == []  # the catalog asks no upstream


async def test_kind12_catalog_pagination(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    for name in ("a/x", "b/x", "c/x", "d/x", "e/x"):
        fake_registry.add_image(name, "v1", 1)
        await _pull(mirror, name)
    repos, link = await _catalog(mirror, "?n=2")
    assert (repos, link) == (["a/x", "b/x"], '</v2/_catalog?last=b/x&n=2>; rel="next"')
    repos, link = await _catalog(mirror, "?last=b/x&n=2")
    assert (repos, link) == (["c/x", "d/x"], '</v2/_catalog?last=d/x&n=2>; rel="next"')
    assert await _catalog(mirror, "?last=d/x&n=2") == (["e/x"], None)
    assert await _catalog(mirror, "?last=e/x") == ([], None)
    assert await _catalog(mirror, "?n=0") == ([], None)
    assert await _catalog(mirror, "?n=5") == (["a/x", "b/x", "c/x", "d/x", "e/x"], None)


async def test_kind12_catalog_shows_only_what_the_caller_may_read(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("team/private", "v1", 1)
    fake_registry.add_image("library/public", "v1", 1)
    fake_registry.private["team/private"] = {"alice"}
    fake_registry.users["alice"] = "secret"
    await _pull(mirror, "team/private", ALICE)
    await _pull(mirror, "public")
    assert (await _catalog(mirror))[0] == ["library/public"]  # anonymous: never the private one
    assert (await _catalog(mirror, headers=ALICE))[0] == ["team/private"]  # alice: what she was allowed
    bob = {"Authorization": aiohttp.encode_basic_auth("bob", "x")}
    assert (await _catalog(mirror, headers=bob))[0] == []  # nobody asked upstream for bob yet


async def test_kind12_catalog_denied_repository_is_hidden(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("team/app", "v1", 1)
    await _pull(mirror, "team/app")
    assert (await _catalog(mirror))[0] == ["team/app"]
    fake_registry.private["team/app"] = set()  # upstream now refuses anonymous clients
    mirror.clock.advance(3600)
    resp = await mirror.client.get("/v2/team/app/manifests/v1")
    assert resp.status == 401
    assert (await _catalog(mirror))[0] == []


async def test_kind12_catalog_share_with_anonymous_lists_the_whole_upstream(
        fake_registry: FakeRegistry, ghcr: FakeRegistry, tmp_path: Path, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    mirror = await mirror_with_ghcr(fake_registry, ghcr, tmp_path, aiohttp_client, share_with_anonymous=True)
    ghcr.add_image("org/app", "v1", 1)
    ghcr.private["org/app"] = {"alice"}
    ghcr.users["alice"] = "secret"
    await _pull(mirror, "ghcr.io/org/app", ALICE)
    assert (await _catalog(mirror))[0] == ["ghcr.io/org/app"]  # the operator opted out for anonymous clients


@pytest.mark.parametrize("query", ["?n=abc", "?n=-1", "?n=99999999"])
async def test_kind12_catalog_bad_n_is_400(mirror: Mirror, query: str) -> None:
    resp = await mirror.client.get(f"/v2/_catalog{query}")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
