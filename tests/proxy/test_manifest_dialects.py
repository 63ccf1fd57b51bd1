"""Manifests as real registries send them: generic Content-Types (CDNs), signed schema1 (quay.io,
old Docker Hub images), and tags that do not exist yet (negative caching)."""
from __future__ import annotations

import json

import pytest

from mirror.mediatypes import MANIFEST_TYPES
from tests.conftest import Mirror
from tests.fakes.registry import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeRegistry
from tests.fakes.schema1 import SCHEMA1, SCHEMA1_SIGNED, add_schema1_image

ACCEPT_ALL = {"Accept": ", ".join(MANIFEST_TYPES)}
GENERIC = ["text/plain", "application/json", "application/octet-stream", "binary/octet-stream"]


def _mismatches(mirror: Mirror) -> float:
    return mirror.services.metrics.digest_mismatches.labels("docker.io")._value.get()


@pytest.mark.parametrize("generic", GENERIC)
@pytest.mark.parametrize("kind", ["schema2", "oci", "list", "oci-index", "bare-oci-index"])
async def test_kind3_generic_content_type_is_served_as_the_manifests_own_type(
        mirror: Mirror, fake_registry: FakeRegistry, generic: str, kind: str) -> None:
    image = fake_registry.add_image("library/app", None, 1, kind="oci" if "oci" in kind else "schema2")
    if kind in ("schema2", "oci"):
        m = fake_registry.add_image("library/app", "1", 1, kind=kind)  # type: ignore[arg-type]
        digest, body, expected = m.digest, m.body, m.media_type
    elif kind == "bare-oci-index":  # OCI lets an index leave out its mediaType
        body = json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.body)}]}).encode()
        digest, expected = fake_registry.add_manifest("library/app", body, OCI_INDEX, "1"), OCI_INDEX
    else:
        index = fake_registry.add_index("library/app", "1", [image], kind=kind)  # type: ignore[arg-type]
        digest, body, expected = index.digest, index.body, index.media_type
    fake_registry.manifest_content_type = generic
    for ref in ("1", digest, "1"):  # cold by tag, then by digest, then warm by tag
        resp = await mirror.client.get(f"/v2/library/app/manifests/{ref}", headers=ACCEPT_ALL)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == expected
        assert resp.headers["Docker-Content-Digest"] == digest
        assert await resp.read() == body
        head = await mirror.client.head(f"/v2/library/app/manifests/{ref}", headers=ACCEPT_ALL)
        assert (head.status, head.headers["Content-Type"]) == (200, expected)
    row = await mirror.services.manifests.metadata.content.get(digest)
    assert row is not None and row.media_type == expected


async def test_kind3_a_cdn_page_instead_of_a_manifest_is_refused_and_not_cached(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    html = b"<html><body>Service temporarily unavailable</body></html>"
    digest = fake_registry.add_manifest("library/app", html, DOCKER_MANIFEST, "1")
    fake_registry.manifest_content_type = "text/html"
    resp = await mirror.client.get("/v2/library/app/manifests/1", headers=ACCEPT_ALL)
    assert resp.status == 502
    error = (await resp.json())["errors"][0]
    assert error["code"] == "MANIFEST_INVALID" and "not a manifest" in error["message"]
    assert await mirror.services.manifests.metadata.content.get(digest) is None
    assert not mirror.services.manifests.store.path(digest).exists()


@pytest.mark.parametrize("signed", [True, False])
async def test_kind4_schema1_is_verified_stored_and_served_by_tag_and_digest(
        mirror: Mirror, fake_registry: FakeRegistry, signed: bool) -> None:
    image = add_schema1_image(fake_registry, "library/old", "1", layers=2, signed=signed)
    media_type = SCHEMA1_SIGNED if signed else SCHEMA1
    for ref in ("1", image.digest, "1"):
        resp = await mirror.client.get(f"/v2/library/old/manifests/{ref}", headers=ACCEPT_ALL)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == media_type
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["ETag"] == f'"{image.digest}"'
        assert await resp.read() == image.body
    assert _mismatches(mirror) == 0
    assert fake_registry.count("GET", "manifest") == 1
    for layer in json.loads(image.body)["fsLayers"]:  # its layers are linked to the repository
        resp = await mirror.client.get(f"/v2/library/old/blobs/{layer['blobSum']}")
        assert resp.status == 200
    fake_registry.fail_status = 503  # cached schema1 outlives the upstream, by digest too
    resp = await mirror.client.get(f"/v2/library/old/manifests/{image.digest}", headers=ACCEPT_ALL)
    assert resp.status == 200 and await resp.read() == image.body


async def test_kind4_schema1_fetched_by_digest_first(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = add_schema1_image(fake_registry, "library/old", "1")
    resp = await mirror.client.get(f"/v2/library/old/manifests/{image.digest}", headers=ACCEPT_ALL)
    assert resp.status == 200 and resp.headers["Content-Type"] == SCHEMA1_SIGNED
    assert await resp.read() == image.body


async def test_kind4_a_schema1_whose_signature_fails_is_refused(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = add_schema1_image(fake_registry, "library/old", "1")
    forged = image.body.replace(b'"architecture": "amd64"', b'"architecture": "arm64"')
    repository = fake_registry.repos["library/old"]
    repository.manifests[image.digest] = (forged, SCHEMA1_SIGNED)
    resp = await mirror.client.get("/v2/library/old/manifests/1", headers=ACCEPT_ALL)
    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert await mirror.services.manifests.metadata.content.get(image.digest) is None


async def test_kind4_a_schema1_with_another_payload_than_claimed_is_a_mismatch(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = add_schema1_image(fake_registry, "library/old", "1")
    other = add_schema1_image(fake_registry, "library/old", "2")
    fake_registry.repos["library/old"].manifests[image.digest] = (other.body, SCHEMA1_SIGNED)
    resp = await mirror.client.get(f"/v2/library/old/manifests/{image.digest}", headers=ACCEPT_ALL)
    assert resp.status == 502
    assert _mismatches(mirror) == 1


async def test_negative_ttl_a_missing_tag_is_asked_once_per_ttl(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "1", 1)
    for _ in range(5):
        resp = await mirror.client.get("/v2/library/app/manifests/next", headers=ACCEPT_ALL)
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        head = await mirror.client.head("/v2/library/app/manifests/next", headers=ACCEPT_ALL)
        assert head.status == 404
    assert fake_registry.count(kind="manifest") == 1
    fake_registry.add_image("library/app", "next", 1)  # pushed meanwhile: seen once the 404 expires
    mirror.clock.advance(29)
    assert (await mirror.client.get("/v2/library/app/manifests/next", headers=ACCEPT_ALL)).status == 404
    mirror.clock.advance(2)
    assert (await mirror.client.get("/v2/library/app/manifests/next", headers=ACCEPT_ALL)).status == 200
    other = await mirror.client.get("/v2/library/app/manifests/1", headers=ACCEPT_ALL)
    assert other.status == 200  # other tags of the repository are not affected


async def test_negative_ttl_is_per_principal_and_can_be_turned_off(
        fake_registry: FakeRegistry, tmp_path, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    from mirror.app import make_app
    from tests.conftest import FakeClock, mirror_config
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", negative_ttl=0), clock=FakeClock())
    client = await aiohttp_client(app)
    fake_registry.add_image("library/app", "1", 1)
    for _ in range(3):
        assert (await client.get("/v2/library/app/manifests/next", headers=ACCEPT_ALL)).status == 404
    assert fake_registry.count(kind="manifest") == 3


async def test_negative_ttl_does_not_remember_outages(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "1", 1)
    fake_registry.fail_status = 503
    assert (await mirror.client.get("/v2/library/app/manifests/1", headers=ACCEPT_ALL)).status == 502
    fake_registry.fail_status = None
    assert (await mirror.client.get("/v2/library/app/manifests/1", headers=ACCEPT_ALL)).status == 200


async def test_ghcr_strict_accept_the_mirror_names_every_type_it_can_store(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """ghcr.io answers 404 for a manifest whose type the Accept header leaves out."""
    add_schema1_image(fake_registry, "library/old", "1")
    index = fake_registry.add_index("library/app", "1", [fake_registry.add_image("library/app", None, 1)],
                                    kind="oci-index")
    assert (await mirror.client.get("/v2/library/old/manifests/1", headers=ACCEPT_ALL)).status == 200
    assert (await mirror.client.get("/v2/library/app/manifests/1", headers=ACCEPT_ALL)).status == 200
    accepts = [c.headers.get("Accept", "") for c in fake_registry.requests if c.kind == "manifest"]
    assert accepts and all(set(MANIFEST_TYPES) <= {t.strip() for t in a.split(",")} for a in accepts)
    narrow = await mirror.client.get("/v2/library/app/manifests/1", headers={"Accept": DOCKER_MANIFEST})
    assert narrow.status == 404  # passed through with the client's own Accept, as ghcr.io answers it
    assert index.media_type == OCI_INDEX and DOCKER_LIST in MANIFEST_TYPES
