"""Manifests by tag (TTL, HEAD revalidation, stale serving) and by digest, through the HTTP API."""
from __future__ import annotations

import hashlib

from tests.conftest import TAG_TTL, Mirror
from tests.fakes.registry import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeRegistry

ACCEPT = {"Accept": ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX])}


async def test_tag_miss_fetches_verifies_and_serves_upstream_bytes(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 2)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200
    body = await resp.read()
    assert body == image.body
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST
    assert resp.headers["ETag"] == f'"{image.digest}"'
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert int(resp.headers["Content-Length"]) == len(image.body)


async def test_docker_hub_official_images_get_library_prefix(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/busybox", "1", 1)
    resp = await mirror.client.get("/v2/busybox/manifests/1", headers=ACCEPT)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest


async def test_all_four_media_types_are_served_as_stored(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    schema2 = fake_registry.add_image("library/a", "s2", 1)
    oci = fake_registry.add_image("library/a", "oci", 1, kind="oci")
    arm = fake_registry.add_image("library/a", None, 1, platform="linux/arm64")
    listing = fake_registry.add_index("library/a", "list", [schema2, arm])
    oci_arm = fake_registry.add_image("library/a", None, 1, kind="oci", platform="linux/arm64")
    index = fake_registry.add_index("library/a", "index", [oci, oci_arm], kind="oci-index")
    for tag, m in (("s2", schema2), ("oci", oci), ("list", listing), ("index", index)):
        for ref in (tag, m.digest):
            resp = await mirror.client.get(f"/v2/library/a/manifests/{ref}", headers=ACCEPT)
            assert resp.status == 200, ref
            assert resp.headers["Content-Type"] == m.media_type
            assert await resp.read() == m.body


async def test_fresh_tag_costs_zero_upstream_requests(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/alpine", "3", 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    fake_registry.reset_counts()
    mirror.clock.advance(TAG_TTL - 1)
    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, "/v2/library/alpine/manifests/3", headers=ACCEPT)
        assert resp.status == 200
    assert fake_registry.count() == 0


async def test_stale_unchanged_tag_costs_one_head_and_extends_ttl(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    fake_registry.reset_counts()
    mirror.clock.advance(TAG_TTL + 1)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    assert fake_registry.count(method="HEAD", kind="manifest") == 1
    assert fake_registry.count(method="GET") == 0
    mirror.clock.advance(TAG_TTL - 5)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
    assert fake_registry.count() == 1


async def test_stale_moved_tag_gets_the_new_manifest_by_digest(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    newer = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.reset_counts()
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.headers["Docker-Content-Digest"] == newer.digest
    assert await resp.read() == newer.body
    gets = [c for c in fake_registry.requests if c.method == "GET"]
    assert [c.path for c in gets] == [f"/v2/library/alpine/manifests/{newer.digest}"]


async def test_tag_moved_to_known_content_needs_no_get(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    old = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.add_image("library/alpine", "4", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    await mirror.client.get("/v2/library/alpine/manifests/4", headers=ACCEPT)
    fake_registry.set_tag("library/alpine", "4", old.digest)
    fake_registry.reset_counts()
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/4", headers=ACCEPT)
    assert resp.headers["Docker-Content-Digest"] == old.digest
    assert fake_registry.count(method="GET") == 0


async def test_stale_tag_served_when_upstream_fails(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    for fault in (503, 500, 429):
        mirror.clock.advance(TAG_TTL + 1)
        fake_registry.fail_status = fault
        resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
        assert resp.status == 200, fault
        assert await resp.read() == image.body
    metrics = mirror.services.metrics
    assert metrics.stale_served.labels("docker.io", "5xx")._value.get() == 2
    assert metrics.stale_served.labels("docker.io", "ratelimited")._value.get() == 1


async def test_stale_tag_served_when_upstream_unreachable(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    await fake_registry.close()
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == image.body


async def test_stale_tag_served_when_upstream_hangs(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    fake_registry.stall_before_headers = True
    mirror.clock.advance(TAG_TTL + 1)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == image.body
    fake_registry.stall_before_headers = False


async def test_upstream_errors_without_cache_are_relayed(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    resp = await mirror.client.get("/v2/library/nothing/manifests/1", headers=ACCEPT)
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    fake_registry.fail_status = 503
    resp = await mirror.client.get("/v2/library/nothing/manifests/other", headers=ACCEPT)
    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    fake_registry.fail_status = None
    fake_registry.add_image("library/limited", "1", 1)
    fake_registry.rate_limited = True
    fake_registry.retry_after = 42
    resp = await mirror.client.get("/v2/library/limited/manifests/1", headers=ACCEPT)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "42"
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    await fake_registry.close()
    resp = await mirror.client.get("/v2/library/nothing/manifests/2", headers=ACCEPT)
    assert resp.status == 503
    assert "cannot connect" in (await resp.json())["errors"][0]["message"]


async def test_manifest_by_digest_is_immutable_and_cached(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", None, 1)
    for _ in range(3):
        resp = await mirror.client.get(f"/v2/library/alpine/manifests/{image.digest}", headers=ACCEPT)
        assert await resp.read() == image.body
    assert fake_registry.count(kind="manifest") == 1
    mirror.clock.advance(10 * TAG_TTL)
    fake_registry.fail_status = 503
    resp = await mirror.client.get(f"/v2/library/alpine/manifests/{image.digest}", headers=ACCEPT)
    assert resp.status == 200


async def test_if_none_match_gives_304(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    resp = await mirror.client.get(
        "/v2/library/alpine/manifests/3", headers={**ACCEPT, "If-None-Match": f'"{image.digest}"'}
    )
    assert resp.status == 304


async def test_head_on_unknown_tag_caches_the_manifest_for_the_get_that_follows(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    resp = await mirror.client.head("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert int(resp.headers["Content-Length"]) == len(image.body)
    fake_registry.reset_counts()
    resp = await mirror.client.get(f"/v2/library/alpine/manifests/{image.digest}", headers=ACCEPT)
    assert await resp.read() == image.body
    assert fake_registry.count() == 0
    await fake_registry.close()
    assert (await mirror.client.head("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200


async def test_client_that_cannot_take_cached_type_is_forwarded(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    amd = fake_registry.add_image("library/multi", None, 1)
    arm = fake_registry.add_image("library/multi", None, 1, platform="linux/arm64")
    fake_registry.add_index("library/multi", "1", [amd, arm])
    await mirror.client.get("/v2/library/multi/manifests/1", headers=ACCEPT)
    resp = await mirror.client.get("/v2/library/multi/manifests/1", headers={"Accept": OCI_MANIFEST})
    # the fake refuses types a client does not accept, as some registries do
    assert resp.status == 404


async def test_corrupt_manifest_from_upstream_is_not_cached(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", None, 1)
    forged = image.body.replace(b'"schemaVersion": 2', b'"schemaVersion": 2 ')
    fake_registry.repos["library/alpine"].manifests[image.digest] = (forged, image.media_type)
    resp = await mirror.client.get(f"/v2/library/alpine/manifests/{image.digest}", headers=ACCEPT)
    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert mirror.services.manifests.store.size(image.digest) is None
    assert mirror.services.metrics.digest_mismatches.labels("docker.io")._value.get() == 1


async def test_manifest_without_digest_header_is_hashed_locally(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/alpine", "3", 1)
    fake_registry.omit_digest_header = True
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(image.body).hexdigest()


async def test_concurrent_stale_requests_share_one_revalidation(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    import asyncio

    fake_registry.add_image("library/alpine", "3", 1)
    await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    mirror.clock.advance(TAG_TTL + 1)
    fake_registry.reset_counts()
    results = await asyncio.gather(
        *(mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT) for _ in range(10))
    )
    assert all(r.status == 200 for r in results)
    assert fake_registry.count(kind="manifest") == 1


async def test_large_manifest_is_read_whole(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/many", "1", [bytes([n % 256, n // 256]) for n in range(2000)])
    assert len(image.body) > 256_000  # many TCP segments: a single read would return only part of it
    resp = await mirror.client.get("/v2/library/many/manifests/1", headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == image.body
