"""Kind 2 (the upstream client's side): manifests and blobs redirected to presigned storage.

Registries on S3 answer manifest and blob GETs and HEADs with a 302 to a URL signed for GET;
the storage refuses HEAD (403) and any `Authorization` (400), and sends
`Content-Type: binary/octet-stream`. A HEAD that cannot tell falls back to one GET whose body
comes back with its digest; a storage host's refusal is an upstream failure (502), not a verdict.
"""
from __future__ import annotations

import hashlib

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.upstream.errors import UpstreamError
from tests.fakes.dialects import Dialect, Servers
from tests.fakes.registry import DOCKER_MANIFEST, FakeRegistry
from tests.proxy.test_manifests import ACCEPT
from tests.upstream.conftest import MirrorFor
from tests.upstream.test_redirects import upstream_at


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_kind2_refused_head_falls_back_to_one_get(s3_registry: Dialect) -> None:
    registry, storage = s3_registry.registry, s3_registry.storage
    assert storage is not None
    image = registry.add_image("group/app", "1", 1)
    upstream = upstream_at(s3_registry.url)
    try:
        probe = await upstream.head_manifest("group/app", "1", "*/*", None)
    finally:
        await upstream.close()
    assert probe.digest == image.digest == sha256(image.body)
    assert probe.body == image.body and probe.size == len(image.body)
    assert probe.media_type == "binary/octet-stream", "storage's type is passed on for the caller to judge"
    assert registry.count("HEAD", "manifest") == 2, "challenged, then with the token"
    assert registry.count("GET", "manifest") == 1, "exactly one GET, with the token already in hand"
    assert registry.count(kind="token") == 1
    assert (storage.count("HEAD"), storage.count("GET")) == (1, 1)
    assert storage.authorization_headers() == []


async def test_kind2_manifest_and_blob_gets_reach_storage_without_authorization(s3_registry: Dialect) -> None:
    registry, storage = s3_registry.registry, s3_registry.storage
    assert storage is not None
    image = registry.add_image("group/app", "1", 1)
    upstream = upstream_at(s3_registry.url)
    try:
        got = await upstream.get_manifest("group/app", image.digest, "*/*", None)
        assert (got.body, got.media_type, got.digest) == (image.body, "binary/octet-stream", None)
        resp = await upstream.open_blob("group/app", image.layer_digests[0], None)
        async with resp:
            assert await resp.read() == image.layers[0]
        assert await upstream.head_blob("group/app", image.layer_digests[0], None) == len(image.layers[0])
    finally:
        await upstream.close()
    assert storage.authorization_headers() == []
    ranged = [r for r in storage.requests if "Range" in r.headers]
    assert [(r.method, r.headers["Range"]) for r in ranged] == [("GET", "bytes=0-0")], \
        "a blob HEAD refused by storage becomes a one-byte GET"


async def test_kind2_pull_by_tag_and_digest_through_the_mirror(s3_registry: Dialect, mirror_for: MirrorFor) -> None:
    registry, storage = s3_registry.registry, s3_registry.storage
    assert storage is not None
    image = registry.add_image("group/app", "1", 2)
    mirror = await mirror_for(s3_registry.url)
    for ref in ("1", image.digest, "1"):
        resp = await mirror.client.get(f"/v2/group/app/manifests/{ref}", headers=ACCEPT)
        assert resp.status == 200, await resp.text()
        assert await resp.read() == image.body
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == image.digest
    for digest, layer in zip(image.layer_digests, image.layers):
        blob = await mirror.client.get(f"/v2/group/app/blobs/{digest}")
        assert blob.status == 200 and await blob.read() == layer
    assert registry.count("GET", "manifest") == 1, "the HEAD's fallback GET is the only manifest GET"
    assert storage.authorization_headers() == []


async def test_kind2_storage_refusal_is_an_upstream_failure_not_a_verdict(s3_registry: Dialect) -> None:
    storage = s3_registry.storage
    assert storage is not None
    s3_registry.registry.add_image("group/app", "1", 1)
    storage.expired = True
    upstream = upstream_at(s3_registry.url)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.head_manifest("group/app", "1", "*/*", None)
    finally:
        await upstream.close()
    error = caught.value
    assert error.status == 502 and error.outage
    assert storage.url and storage.url.removeprefix("http://") in error.message and "403" in error.message
    assert "<Error>" not in error.message and "AccessDenied" not in error.message
    assert "X-Amz" not in error.message, "presigned queries stay out of messages"


async def test_kind2_storage_refusal_reaches_clients_as_502(s3_registry: Dialect, mirror_for: MirrorFor) -> None:
    storage = s3_registry.storage
    assert storage is not None
    image = s3_registry.registry.add_image("group/app", "1", 1)
    storage.expired = True
    mirror = await mirror_for(s3_registry.url)
    for path in ("manifests/1", f"manifests/{image.digest}", f"blobs/{image.layer_digests[0]}"):
        resp = await mirror.client.get(f"/v2/group/app/{path}", headers=ACCEPT)
        assert resp.status == 502, path
        body = await resp.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"
        assert "<Error>" not in await resp.text()


async def test_kind2_stale_tag_is_served_while_storage_refuses(s3_registry: Dialect, mirror_for: MirrorFor) -> None:
    storage = s3_registry.storage
    assert storage is not None
    image = s3_registry.registry.add_image("group/app", "1", 1)
    mirror = await mirror_for(s3_registry.url)
    assert (await mirror.client.get("/v2/group/app/manifests/1", headers=ACCEPT)).status == 200
    storage.expired = True
    mirror.clock.advance(3600)
    resp = await mirror.client.get("/v2/group/app/manifests/1", headers=ACCEPT)
    assert resp.status == 200 and await resp.read() == image.body


async def test_kind2_registry_verdicts_are_not_retried_as_get(s3_registry: Dialect) -> None:
    """Only the registry's own 401/403/404 are verdicts: they raise as they are, with no GET."""
    registry = s3_registry.registry
    upstream = upstream_at(s3_registry.url)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.head_manifest("group/app", "missing", "*/*", None)
    finally:
        await upstream.close()
    assert caught.value.status == 404
    assert registry.count("GET", "manifest") == 0


async def test_kind2_head_without_digest_header_falls_back_to_get(fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "1", 1)
    fake_registry.omit_digest_header = True
    assert fake_registry.url
    upstream = upstream_at(fake_registry.url)
    try:
        probe = await upstream.head_manifest("library/app", "1", "*/*", None)
    finally:
        await upstream.close()
    assert (probe.digest, probe.body, probe.media_type) == (image.digest, image.body, DOCKER_MANIFEST)
    assert (fake_registry.count("HEAD", "manifest"), fake_registry.count("GET", "manifest")) == (1, 1)


class NoHead(FakeRegistry):
    """A registry that does not implement HEAD for manifests (`status`)."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self._no_head)
        return app

    @web.middleware
    async def _no_head(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(status=self.status)
        return await handler(request)


@pytest.mark.parametrize("status", [405, 501])
async def test_kind2_head_not_supported_falls_back_to_get(servers: Servers, status: int) -> None:
    registry = NoHead(status)
    url = await servers.serve(registry.app)
    image = registry.add_image("library/app", "1", 1)
    upstream = upstream_at(url)
    try:
        probe = await upstream.head_manifest("library/app", "1", "*/*", None)
        size = await upstream.head_blob("library/app", image.layer_digests[0], None)
    finally:
        await upstream.close()
    assert probe.digest == image.digest and probe.body == image.body
    assert size == len(image.layers[0])


async def test_kind2_storage_answering_html_is_passed_on_as_such(s3_registry: Dialect) -> None:
    """A portal's HTML page comes back with its own type: the caller refuses it as a manifest."""
    storage = s3_registry.storage
    assert storage is not None
    s3_registry.registry.add_image("group/app", "1", 1)
    storage.answer_html = True
    upstream = upstream_at(s3_registry.url)
    try:
        got = await upstream.get_manifest("group/app", "1", "*/*", None)
    finally:
        await upstream.close()
    assert got.media_type == "text/html" and got.digest is None


async def test_kind2_storage_answering_html_gets_a_clear_error_and_caches_nothing(
    s3_registry: Dialect, mirror_for: MirrorFor
) -> None:
    storage = s3_registry.storage
    assert storage is not None
    s3_registry.registry.add_image("group/app", "1", 1)
    storage.answer_html = True
    mirror = await mirror_for(s3_registry.url)
    resp = await mirror.client.get("/v2/group/app/manifests/1", headers=ACCEPT)
    assert resp.status == 502  # upstream sent something that is not a manifest
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert [p for p in (mirror.data_dir / "content").rglob("*") if p.is_file()] == []


async def test_kind2_blob_head_through_the_mirror_on_presigned_storage(
    s3_registry: Dialect, mirror_for: MirrorFor
) -> None:
    storage = s3_registry.storage
    assert storage is not None
    image = s3_registry.registry.add_image("group/app", "1", 1)
    mirror = await mirror_for(s3_registry.url)
    resp = await mirror.client.head(f"/v2/group/app/blobs/{image.layer_digests[0]}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(image.layers[0]))
    assert storage.authorization_headers() == []
