"""The referrers API (OCI 1.1): passthrough, artifactType filtering, a short cache per principal, stale on outage."""
from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from mirror.proxy.referrers import EMPTY_INDEX, FRESH_FOR
from tests.conftest import Mirror
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Image

SBOM = "application/spdx+json"
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"


def _referrer(registry: FakeRegistry, repo: str, subject: Image, artifact_type: str, note: str) -> str:
    config = b"{}"
    registry.add_blob(repo, config)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                   "digest": registry.add_blob(repo, config)},
        "layers": [], "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.body)},
        "annotations": {"note": note},
    }).encode()
    return registry.add_manifest(repo, body, OCI_MANIFEST)


@pytest.fixture
def subject(fake_registry: FakeRegistry) -> tuple[Image, str, str]:
    image = fake_registry.add_image("library/app", "v1", 1, kind="oci")
    sbom = _referrer(fake_registry, "library/app", image, SBOM, "sbom")
    sig = _referrer(fake_registry, "library/app", image, SIG, "sig")
    return image, sbom, sig


async def _get(mirror: Mirror, url: str, artifact_type: str | None = None,
               **headers: str) -> tuple[aiohttp.ClientResponse, dict[str, object]]:
    resp = await mirror.client.get(url, headers=headers, params={"artifactType": artifact_type} if artifact_type else None)
    body = await resp.read()
    return resp, json.loads(body)


async def test_kind12_referrers_pass_through(mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, sbom, sig = subject
    resp, index = await _get(mirror, f"/v2/app/referrers/{image.digest}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in resp.headers
    assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2
    assert sorted(m["digest"] for m in index["manifests"]) == sorted([sbom, sig])
    assert fake_registry.count("GET", "referrers") == 1
    assert fake_registry.count("HEAD", "manifest") == 1  # the access probe, as the subject


async def test_kind12_referrers_filtered_by_upstream(mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, sbom, _ = subject
    resp, index = await _get(mirror, f"/v2/app/referrers/{image.digest}", SBOM)
    assert resp.status == 200 and resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in index["manifests"]] == [sbom]
    assert fake_registry.requests[-1].query == "artifactType=application/spdx%2Bjson"


async def test_kind12_referrers_filtered_by_the_mirror_when_upstream_ignores_artifact_type(
        mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, _, sig = subject
    fake_registry.referrers_filter = False
    resp, index = await _get(mirror, f"/v2/app/referrers/{image.digest}", SIG)
    assert resp.status == 200 and resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(sig, SIG)]
    assert index["mediaType"] == OCI_INDEX
    resp, index = await _get(mirror, f"/v2/app/referrers/{image.digest}", "application/none")
    assert index["manifests"] == [] and resp.headers["OCI-Filters-Applied"] == "artifactType"


async def test_kind12_referrers_without_upstream_api_is_an_empty_index(
        mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, _, _ = subject
    fake_registry.referrers_api = False
    resp = await mirror.client.get(f"/v2/app/referrers/{image.digest}")
    assert resp.status == 200 and resp.headers["Content-Type"] == OCI_INDEX
    assert await resp.read() == EMPTY_INDEX
    assert json.loads(EMPTY_INDEX) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    resp = await mirror.client.get(f"/v2/app/referrers/{image.digest}", params={"artifactType": SBOM})
    assert resp.status == 200 and resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert json.loads(await resp.read())["manifests"] == []


async def test_kind12_referrers_of_an_unknown_subject_is_an_empty_index(
        mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    unknown = "sha256:" + "0" * 64
    resp = await mirror.client.get(f"/v2/app/referrers/{unknown}")
    assert resp.status == 200 and await resp.read() == EMPTY_INDEX
    assert fake_registry.count("GET", "referrers") == 0


async def test_kind12_referrers_cached_per_principal_and_stale_on_outage(
        mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, _, _ = subject
    url = f"/v2/app/referrers/{image.digest}"
    first, index = await _get(mirror, url)
    again, same = await _get(mirror, url)
    assert again.headers["X-Mirror-Cache"] == "hit" and same == index
    assert fake_registry.count("GET", "referrers") == 1
    other, _ = await _get(mirror, url, Authorization=aiohttp.encode_basic_auth("u", "p"))
    assert other.status == 200 and fake_registry.count("GET", "referrers") == 2
    mirror.clock.advance(FRESH_FOR + 1)
    fake_registry.fail_status = 503
    stale, same = await _get(mirror, url)
    assert stale.status == 200 and stale.headers["X-Mirror-Cache"] == "stale" and same == index


async def test_kind12_referrers_outage_with_nothing_cached_is_an_error(
        mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, _, _ = subject
    await mirror.client.head(f"/v2/app/manifests/{image.digest}")  # access known: the probe is not asked again
    fake_registry.fail_status = 503
    resp = await mirror.client.get(f"/v2/app/referrers/{image.digest}")
    assert resp.status == 502  # upstream answered 5xx (503 is for an upstream that cannot be reached)
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_kind12_referrers_access_is_checked_like_manifests(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("team/private", "v1", 1, kind="oci")
    fake_registry.private["team/private"] = {"alice"}
    fake_registry.users["alice"] = "secret"
    resp = await mirror.client.get(f"/v2/team/private/referrers/{image.digest}")
    assert resp.status == 401
    assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert "WWW-Authenticate" in resp.headers
    assert fake_registry.count("GET", "referrers") == 0


async def test_kind12_referrers_upstream_garbage_is_502(mirror: Mirror, fake_registry: FakeRegistry, subject) -> None:  # type: ignore[no-untyped-def]
    image, _, _ = subject

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    for resource in fake_registry.app.router.resources():
        for route in resource:
            if route.name == "referrers":
                route._handler = html  # noqa: SLF001  (a registry that answers HTML)
    resp = await mirror.client.get(f"/v2/app/referrers/{image.digest}")
    assert resp.status == 502
    assert "not an image index" in (await resp.json())["errors"][0]["message"]


@pytest.mark.parametrize("target", [
    "/v2/app/referrers/sha256:abc", "/v2/app/referrers/latest", "/v2/app/referrers/sha256:" + "A" * 64,
    "/v2/Bad/referrers/sha256:" + "a" * 64,
])
async def test_kind12_referrers_bad_input_is_400(mirror: Mirror, fake_registry: FakeRegistry, target: str) -> None:
    resp = await mirror.client.get(target)
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] in ("DIGEST_INVALID", "NAME_INVALID")
    assert fake_registry.requests == []


async def test_kind12_referrers_are_read_only(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    resp = await mirror.client.put("/v2/app/referrers/sha256:" + "a" * 64, data=b"")
    assert resp.status == 405
