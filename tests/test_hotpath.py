"""Fresh manifest hits answered at the connection (mirror.hotpath): the same bytes as the full
path, in order with everything else on the connection, and never once what they depend on changed.

Every test here serves the mirror as production does (tests.conftest's `aiohttp_client` uses
MirrorRunner), and knows whether a request took the full path by counting the calls of
`ManifestService.get`.
"""
from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable

import pytest

from mirror import server
from mirror.adminapi import ADMIN
from mirror.proxy.manifests import ManifestService
from tests.conftest import TAG_TTL, Mirror
from tests.fakes.registry import DOCKER_MANIFEST, OCI_MANIFEST, FakeRegistry, Image
from tests.proxy.test_manifests import ACCEPT

Response = tuple[int, dict[str, str], bytes]
TAG = "/v2/library/app/manifests/1"


class FullPath:
    """Counts the requests that reached `ManifestService.get`."""

    def __init__(self, service: ManifestService) -> None:
        self.calls = 0
        inner = service.get

        async def get(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return await inner(*args, **kwargs)  # type: ignore[arg-type]

        service.get = get  # type: ignore[method-assign]


@pytest.fixture
def image(fake_registry: FakeRegistry) -> Image:
    return fake_registry.add_image("library/app", "1", 2)


@pytest.fixture
def full(mirror: Mirror) -> FullPath:
    return FullPath(mirror.services.manifests)


async def _get(mirror: Mirror, path: str, method: str = "GET", **headers: str) -> Response:
    resp = await mirror.client.request(method, path, headers={**ACCEPT, **headers})
    body = await resp.read()
    return resp.status, {k.lower(): v for k, v in resp.headers.items() if k.lower() != "date"}, body


async def _warm(mirror: Mirror, path: str, **headers: str) -> Response:
    """Fetch, then hit once by the full path (which leaves the hot answer)."""
    await _get(mirror, path, **headers)
    return await _get(mirror, path, **headers)


@pytest.mark.parametrize("ref", ["tag", "digest", "tag?ns=docker.io"])
async def test_a_repeated_hit_is_answered_at_the_connection_with_the_same_bytes(
    mirror: Mirror, image: Image, full: FullPath, ref: str
) -> None:
    """By tag, by digest, and as containerd asks a mirror (`?ns=` names the registry)."""
    path = {"tag": TAG, "digest": f"/v2/library/app/manifests/{image.digest}", "tag?ns=docker.io": f"{TAG}?ns=docker.io"}[ref]
    slow = await _warm(mirror, path)
    assert slow[0] == 200 and slow[2] == image.body and slow[1]["x-mirror-cache"] == "hit"
    calls = full.calls
    for _ in range(3):
        assert await _get(mirror, path) == slow
    head = await _get(mirror, path, "HEAD")
    assert head == (200, slow[1], b"")
    assert full.calls == calls, "the repeated hits took the full path"


async def test_hot_answers_are_counted_and_logged(
    mirror: Mirror, image: Image, full: FullPath, caplog: pytest.LogCaptureFixture
) -> None:
    await _warm(mirror, TAG)
    before = mirror.services.metrics.requests.labels("manifest", "GET", "hit")._value.get()
    served = mirror.services.metrics.bytes_served.labels("cache")._value.get()
    calls = full.calls
    with caplog.at_level(logging.INFO, logger="mirror.access"):
        await _get(mirror, TAG)
        await _get(mirror, TAG, "HEAD")
    assert full.calls == calls
    assert mirror.services.metrics.requests.labels("manifest", "GET", "hit")._value.get() == before + 1
    assert mirror.services.metrics.requests.labels("manifest", "HEAD", "hit")._value.get() == 1
    assert mirror.services.metrics.bytes_served.labels("cache")._value.get() == served + len(image.body)
    lines = [r.getMessage() for r in caplog.records if r.name == "mirror.access"]
    assert len(lines) == 2
    assert lines[0].startswith(f"127.0.0.1 GET {TAG} 200 {len(image.body)} ") and lines[0].endswith(" hit")
    assert lines[1].startswith(f"127.0.0.1 HEAD {TAG} 200 0 ") and lines[1].endswith(" hit")


async def test_a_hot_hit_ages_the_image_and_counts_for_its_repository(
    mirror: Mirror, image: Image, full: FullPath
) -> None:
    await _warm(mirror, TAG)
    for digest in (image.config_digest, *image.layer_digests):
        assert (await mirror.client.get(f"/v2/library/app/blobs/{digest}")).status == 200
    await mirror.settled()
    await _get(mirror, TAG)  # the image's parts are known now
    await mirror.services.manifests.metadata.flush()
    mirror.clock.advance(10)
    calls = full.calls
    await _get(mirror, TAG)
    assert full.calls == calls
    await mirror.services.manifests.metadata.flush()
    usage = {digest: at for digest, _, _, at in await mirror.services.manifests.metadata.content.usage()}
    for digest in (image.digest, image.config_digest, *image.layer_digests):
        assert usage[digest] == mirror.clock(), digest
    assert await mirror.services.manifests.metadata.stats.top_hits(1) == [("docker.io", "library/app", 3)]


async def _expire_tag(mirror: Mirror, fake: FakeRegistry, image: Image) -> None:
    mirror.clock.advance(TAG_TTL + 1)


async def _purge(mirror: Mirror, fake: FakeRegistry, image: Image) -> None:
    assert (await mirror.app[ADMIN].purge(image="library/app:1"))["removed"]


async def _evict(mirror: Mirror, fake: FakeRegistry, image: Image) -> None:
    await mirror.services.blobs.metadata.drop_content([image.digest])
    mirror.services.blobs.store.remove(image.digest)
    mirror.services.manifests.forget([image.digest])


@pytest.mark.parametrize("change", [_expire_tag, _purge, _evict])
async def test_what_a_hit_depends_on_ends_its_hot_answer(
    mirror: Mirror, fake_registry: FakeRegistry, image: Image, full: FullPath,
    change: Callable[[Mirror, FakeRegistry, Image], Awaitable[None]],
) -> None:
    await _warm(mirror, TAG)
    moved = fake_registry.add_image("library/app", "1", 1)  # upstream moved the tag meanwhile
    await change(mirror, fake_registry, image)
    calls = full.calls
    status, headers, body = await _get(mirror, TAG)
    assert full.calls == calls + 1, "served from the connection after what it depends on changed"
    assert status == 200 and body == moved.body and headers["docker-content-digest"] == moved.digest


async def test_an_expired_token_is_refused_not_answered(mirror: Mirror, image: Image) -> None:
    token = (await (await mirror.client.get("/token")).json())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert (await _warm(mirror, TAG, **auth))[0] == 200
    assert (await _get(mirror, TAG, **auth))[0] == 200
    mirror.clock.advance(3600)
    status, _, body = await _get(mirror, TAG, **auth)
    assert status == 401 and b"UNAUTHORIZED" in body


async def test_a_refusal_learned_on_another_tag_ends_the_hot_answer(
    mirror: Mirror, fake_registry: FakeRegistry, full: FullPath
) -> None:
    fake_registry.require_auth = True
    fake_registry.users = {"alice": "pw"}
    fake_registry.private = {"library/secret": {"alice"}}
    fake_registry.add_image("library/secret", "1", 1)
    fake_registry.add_image("library/secret", "2", 1)
    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    path = "/v2/library/secret/manifests/1"
    await _warm(mirror, path, **alice)
    assert (await _get(mirror, path, **alice))[0] == 200
    fake_registry.fail_status = 403  # upstream stops letting alice read it
    assert (await _get(mirror, "/v2/library/secret/manifests/2", **alice))[0] in (401, 403)
    status, _, body = await _get(mirror, path, **alice)
    assert status == 403 and b"DENIED" in body


async def test_other_principals_and_accept_headers_are_answered_for_themselves(
    mirror: Mirror, fake_registry: FakeRegistry, image: Image, full: FullPath
) -> None:
    await _warm(mirror, TAG)
    calls = full.calls
    # a client that takes only OCI manifests gets upstream's answer for that, not the hot docker manifest
    status, headers, _ = await _get(mirror, TAG, Accept=OCI_MANIFEST)
    assert full.calls == calls + 1
    assert headers.get("content-type") != DOCKER_MANIFEST or status != 200
    token = (await (await mirror.client.get("/token")).json())["token"]
    await _get(mirror, TAG, Authorization=f"Bearer {token}")
    assert full.calls == calls + 2, "another principal's first request skipped the access check"


@pytest.mark.parametrize("header, status", [
    ({"If-None-Match": "{etag}"}, 304),
    ({"Range": "bytes=0-1"}, 200),
    ({"X-Unknown": "1"}, 200),
    ({"Connection": "close"}, 200),
])
async def test_requests_the_key_does_not_cover_take_the_full_path(
    mirror: Mirror, image: Image, full: FullPath, header: dict[str, str], status: int
) -> None:
    await _warm(mirror, TAG)
    calls = full.calls
    headers = {k: v.format(etag=f'"{image.digest}"') for k, v in header.items()}
    assert (await _get(mirror, TAG, **headers))[0] == status
    assert full.calls == calls + 1


# -- one connection, bytes as written -------------------------------------------------------------

async def _connection(mirror: Mirror) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = mirror.client.server
    return await asyncio.open_connection(server.host, server.port)


def _request(method: str, path: str, extra: str = "") -> bytes:
    accept = ACCEPT["Accept"]
    return f"{method} {path} HTTP/1.1\r\nHost: mirror\r\nAccept: {accept}\r\n{extra}\r\n".encode()


async def _read(reader: asyncio.StreamReader, method: str) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    length = int(headers.get("content-length", 0)) if method != "HEAD" else 0
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    headers.pop("date", None)
    return int(lines[0].split()[1]), headers, body


async def test_pipelined_requests_are_answered_in_order_whoever_answers(
    mirror: Mirror, fake_registry: FakeRegistry, image: Image, full: FullPath
) -> None:
    await _warm(mirror, TAG)
    blob = f"/v2/library/app/blobs/{image.layer_digests[0]}"
    reader, writer = await _connection(mirror)
    try:
        sequence = [("GET", TAG), ("GET", blob), ("HEAD", TAG), ("GET", "/v2/library/app/manifests/nope"),
                    ("GET", TAG)]
        writer.write(b"".join(_request(method, path) for method, path in sequence))
        answers = [await _read(reader, method) for method, _ in sequence]
    finally:
        writer.close()
    assert [a[0] for a in answers] == [200, 200, 200, 404, 200]
    assert answers[0][2] == answers[4][2] == image.body
    assert answers[1][2] == image.layers[0]
    assert answers[2][1]["docker-content-digest"] == image.digest


async def test_a_client_that_pipelines_more_than_it_reads_is_left_to_flow_control(
    mirror: Mirror, image: Image, full: FullPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers from memory stop at the write buffer's limit (here: after one); aiohttp answers
    the rest as the client reads."""
    await _warm(mirror, TAG)
    monkeypatch.setattr(server, "WRITE_BUFFER_LIMIT", 1)
    calls = full.calls
    reader, writer = await _connection(mirror)
    try:
        writer.write(_request("GET", TAG) * 20)
        answers = [await _read(reader, "GET") for _ in range(20)]
    finally:
        writer.close()
    assert all(a[0] == 200 and a[2] == image.body for a in answers)
    assert full.calls == calls + 19


async def test_a_request_sent_while_another_is_answered_waits_its_turn(
    mirror: Mirror, fake_registry: FakeRegistry, image: Image
) -> None:
    await _warm(mirror, TAG)
    layer = image.layer_digests[0]
    hold = fake_registry.hold(layer, after=1000)
    reader, writer = await _connection(mirror)
    try:
        writer.write(_request("GET", f"/v2/library/app/blobs/{layer}"))
        await hold.reached()
        writer.write(_request("GET", TAG))  # a hot request arrives mid-blob
        await asyncio.sleep(0.05)
        hold.release()
        blob = await _read(reader, "GET")
        manifest = await _read(reader, "GET")
    finally:
        writer.close()
    assert blob[2] == image.layers[0]
    assert manifest[0] == 200 and manifest[2] == image.body


POST = (b"POST /token HTTP/1.1\r\nHost: m\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 21\r\n\r\ngrant_type=nothing&x=")


@pytest.mark.parametrize("parts, answers", [
    pytest.param(lambda r: [r[:20], r[20:]], [("GET", 200)], id="a request split in two reads"),
    pytest.param(lambda r: [POST + r], [("POST", 400), ("GET", 200)], id="a request with a body first"),
    pytest.param(lambda r: [POST[:70], POST[70:] + r[:30], r[30:]], [("POST", 400), ("GET", 200)],
                 id="both, split across reads"),
    # what arrives next looks like a whole hot request, but it is the rest of the one begun
    pytest.param(lambda r: [b"GET /nothing HTTP/1.1\r\nX-Pad: ", r], [("GET", 404)], id="a header's value"),
    pytest.param(lambda r: [b"POST /token HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n" % len(r), r],
                 [("POST", 400)], id="a request's body"),
])
async def test_requests_aiohttp_parsed_part_of_leave_the_connection_whole(
    mirror: Mirror, image: Image, parts: Callable[[bytes], list[bytes]], answers: list[tuple[str, int]]
) -> None:
    await _warm(mirror, TAG)
    reader, writer = await _connection(mirror)
    try:
        for part in parts(_request("GET", TAG)):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        for method, status in [*answers, ("GET", 200), ("GET", 200)]:
            if len(answers) == 0:
                writer.write(_request("GET", TAG))
            answer = await _read(reader, method)
            assert answer[0] == status, answer
            if method == "GET" and status == 200:
                assert answer[2] == image.body
            answers = answers[1:]
    finally:
        writer.close()
