"""A primary and a secondary worker in one test process: what the secondary serves, hands over, and trusts."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import MultiDict

from mirror.app import make_app
from aiohttp.typedefs import Handler
from mirror.routes import SERVICES
from mirror.responses import follow
from mirror.responses.follow import TEMP_FILE
from mirror.workers.role import WorkerRole
from tests.byteranges import parse_byteranges
from tests.proxy.test_blob_races import BOUND, Gate, assert_quiet, connections, disconnects, evict
from tests.conftest import ProductionServer, after_local_eviction, mirror_config
from tests.fakes.registry import FakeRegistry, digest_of
from tests.waiting import wait_until

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


@dataclass
class Group:
    secondary: TestClient
    primary_requests: list[str]  # paths the primary answered
    socket: str
    followed: list[str]  # paths the primary answered with its temp file for the secondary to follow
    primary: web.Application
    secondary_app: web.Application

    async def settled(self) -> None:
        """Wait for the primary's background database writes (siblings read what it learnt there)."""
        await self.primary[SERVICES].manifests.metadata.flush()


@pytest.fixture
async def group(fake_registry: FakeRegistry, tmp_path: Path, multiprocess_values: str,
                aiohttp_client) -> AsyncIterator[Group]:  # type: ignore[no-untyped-def]
    assert fake_registry.url
    config = mirror_config(fake_registry.url, tmp_path / "data")
    socket = str(tmp_path / "primary.sock")
    primary = make_app(config, role=WorkerRole(0, socket, multiprocess_values))
    seen: list[str] = []
    followed: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.path)
        response = await handler(request)
        if TEMP_FILE in response.headers:
            followed.append(request.path)
        return response

    primary.middlewares.insert(0, record)
    runner = web.AppRunner(primary)
    await runner.setup()
    await web.UnixSite(runner, socket).start()
    secondary_app = make_app(config, role=WorkerRole(1, socket, multiprocess_values))
    secondary = await aiohttp_client(ProductionServer(secondary_app))
    yield Group(secondary, seen, socket, followed, primary, secondary_app)
    await runner.cleanup()


async def test_misses_go_to_the_primary_and_hits_are_served_locally(group: Group, fake_registry: FakeRegistry) -> None:
    image = fake_registry.add_image("library/app", "v1", 2)
    path = "/v2/library/app/manifests/v1"
    # Accept repeated, as Go clients send it: the primary must see every line
    accept = MultiDict([*ACCEPT.items(), ("Accept", "application/vnd.oci.image.index.v1+json")])
    first = await group.secondary.get(path, headers=accept)
    assert first.status == 200 and first.headers["X-Mirror-Cache"] == "miss"
    assert await first.read() == image.body
    assert group.primary_requests == [path]
    await group.settled()
    second = await group.secondary.get(path, headers=ACCEPT)
    assert second.status == 200 and second.headers["X-Mirror-Cache"] == "hit"
    assert await second.read() == image.body
    assert group.primary_requests == [path]  # served by the secondary itself
    assert fake_registry.count("GET", "manifest") == 1


async def test_blob_head_and_ranges_come_back_unchanged(group: Group, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "v1", [b"x" * 5000])
    manifest = json.loads(await (await group.secondary.get("/v2/library/app/manifests/v1", headers=ACCEPT)).read())
    layer = manifest["layers"][0]["digest"]
    head = await group.secondary.head(f"/v2/library/app/blobs/{layer}")
    assert head.status == 200 and head.headers["Content-Length"] == "5000" and await head.read() == b""
    ranged = await group.secondary.get(f"/v2/library/app/blobs/{layer}", headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and ranged.headers["Content-Range"] == "bytes 10-19/5000"
    assert await ranged.read() == b"x" * 10
    missing = await group.secondary.get(f"/v2/library/app/blobs/sha256:{'0' * 64}")
    assert missing.status == 404 and (await missing.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_secondary_without_its_primary_answers_503_with_an_oci_error(
    fake_registry: FakeRegistry, tmp_path: Path, multiprocess_values: str, aiohttp_client  # type: ignore[no-untyped-def]
) -> None:
    assert fake_registry.url
    fake_registry.add_image("library/app", "v1", 1)
    role = WorkerRole(1, str(tmp_path / "nobody.sock"), multiprocess_values)
    secondary = await aiohttp_client(make_app(mirror_config(fake_registry.url, tmp_path / "data"), role=role))
    resp = await secondary.get("/v2/library/app/manifests/v1", headers=ACCEPT)
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert fake_registry.count("GET", "manifest") == 0  # a secondary never calls upstream itself
    admin = await secondary.get("/admin/stats")
    assert admin.status == 503  # maintenance is the primary's, too


async def test_client_facts_are_trusted_only_from_the_unix_socket(group: Group, fake_registry: FakeRegistry) -> None:
    spoofed = {"X-Mirror-Client-Scheme": "https", "X-Mirror-Client-Address": "10.1.2.3"}
    via_tcp = await group.secondary.get("/v2/", headers=spoofed)  # a client cannot claim them
    assert via_tcp.status == 401 and 'realm="http://' in via_tcp.headers["WWW-Authenticate"]
    loopback = {**spoofed, "X-Mirror-Client-Address": "127.0.0.1"}
    admin = await group.secondary.get("/admin/stats", headers=loopback)
    assert admin.status == 403  # no address opens the admin API over TCP, loopback included
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(group.socket)) as sibling:
        async with sibling.get("http://mirror.test/v2/", headers=spoofed) as resp:
            assert resp.status == 401 and 'realm="https://mirror.test/token"' in resp.headers["WWW-Authenticate"]
        async with sibling.get("http://mirror.test/admin/stats", headers=loopback) as resp:
            assert resp.status == 403  # nor over the primary's socket: it carries TCP clients' requests


async def test_private_images_through_the_secondary_with_a_token_the_primary_issued(
    group: Group, fake_registry: FakeRegistry
) -> None:
    fake_registry.users = {"alice": "alice-pw"}
    fake_registry.private = {"library/secret": {"alice"}}
    image = fake_registry.add_image("library/secret", "v1", 1)
    login = await group.secondary.get(
        "/token?scope=repository:library/secret:pull&service=mirror",
        headers={"Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode()})
    assert login.status == 200
    token = (await login.json())["token"]
    resp = await group.secondary.get("/v2/library/secret/manifests/v1",
                                     headers={**ACCEPT, "Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.body


async def test_concurrent_blob_misses_follow_the_primarys_temp_file(group: Group, fake_registry: FakeRegistry) -> None:
    layer = os.urandom(3 << 20)
    fake_registry.add_image("library/app", "v1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    hold = fake_registry.hold(digest, after=64 * 1024)  # still arriving while the secondary's clients read
    path = f"/v2/library/app/blobs/{digest}"
    # each answer begins once its request follows the primary's fetch: all five are in before release
    responses = await asyncio.wait_for(asyncio.gather(
        *(group.secondary.get(path) for _ in range(4)),
        group.secondary.get(path, headers={"Range": "bytes=1000000-1000009"})), BOUND)
    assert fake_registry.count("GET", "blob") == 1
    hold.release()
    bodies = [await asyncio.wait_for(resp.read(), BOUND) for resp in responses]
    assert [resp.status for resp in responses] == [200] * 4 + [206]
    assert bodies == [layer] * 4 + [layer[1000000:1000010]]
    assert fake_registry.count("GET", "blob") == 1
    assert group.followed.count(path) == 5  # no byte of it went through the socket


async def test_a_corrupt_blob_reaches_the_secondarys_clients_cut_short(group: Group, fake_registry: FakeRegistry) -> None:
    layer = os.urandom(1 << 20)
    fake_registry.add_image("library/app", "v1", [layer])
    fake_registry.corrupt_blobs = True
    resp = await group.secondary.get(f"/v2/library/app/blobs/sha256:{hashlib.sha256(layer).hexdigest()}")
    assert resp.status == 200  # headers go out before the last byte could be checked ...
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # ... and the body never completes


async def test_a_temp_file_the_secondary_cannot_open_is_a_503_not_an_empty_200(
    group: Group, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = os.urandom(1 << 20)
    fake_registry.add_image("library/app", "v1", [layer])

    def gone(*args: object) -> None:
        raise PermissionError("the temp file cannot be read")

    monkeypatch.setattr(follow, "_open", gone)
    resp = await group.secondary.get(f"/v2/library/app/blobs/sha256:{hashlib.sha256(layer).hexdigest()}")
    assert resp.status == 503 and (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_kind10_several_ranges_of_a_miss_through_a_secondary(group: Group, fake_registry: FakeRegistry) -> None:
    layer = os.urandom(1 << 20)
    fake_registry.add_image("library/app", "v1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    hold = fake_registry.hold(digest, after=64 * 1024)  # the fetch is running while the parts are asked for
    path = f"/v2/library/app/blobs/{digest}"
    header, want = "bytes=10-19,1000000-1048575", [(10, 20), (1_000_000, 1 << 20)]
    pending = asyncio.ensure_future(group.secondary.get(path, headers={"Range": header}))
    await asyncio.wait_for(hold.reached(), BOUND)  # the primary's fetch has begun, and is held
    hold.release()
    resp = await asyncio.wait_for(pending, 10)
    body = await asyncio.wait_for(resp.read(), 10)
    assert resp.status == 206 and int(resp.headers["Content-Length"]) == len(body)
    assert resp.headers["ETag"] == f'"{digest}"'
    assert parse_byteranges(resp.headers["Content-Type"], body) == [
        ("application/octet-stream", f"bytes {a}-{b - 1}/{len(layer)}", layer[a:b]) for a, b in want]
    assert group.primary_requests == [path] and group.followed == []  # the parts came through the socket
    head = await group.secondary.head(path, headers={"Range": header})
    assert head.status == 206 and head.headers["Content-Length"] == resp.headers["Content-Length"]
    assert fake_registry.count("GET", "blob") == 1


async def test_kind10_several_ranges_of_a_hit_are_served_by_the_secondary(group: Group, fake_registry: FakeRegistry) -> None:
    layer = os.urandom(100_000)
    fake_registry.add_image("library/app", "v1", [layer])
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    path = f"/v2/library/app/blobs/{digest}"
    assert await (await group.secondary.get(path)).read() == layer
    await group.primary[SERVICES].blobs.inflight.idle()
    await group.settled()
    resp = await group.secondary.get(path, headers={"Range": "bytes=0-9, -10", "If-Range": f'"{digest}"'})
    assert resp.headers["X-Mirror-Cache"] == "hit"
    assert parse_byteranges(resp.headers["Content-Type"], await resp.read()) == [
        ("application/octet-stream", "bytes 0-9/100000", layer[:10]),
        ("application/octet-stream", "bytes 99990-99999/100000", layer[-10:])]
    assert group.primary_requests == [path]  # only the first, cold request reached the primary


# -- issue 12, kinds 1 and 2: eviction races and clients that leave, through a secondary ------------

async def _cached_through(group: Group, fake_registry: FakeRegistry, size: int = 300_000) -> tuple[str, bytes, str]:
    """A blob pulled once through the secondary and stored by the primary: (digest, bytes, path)."""
    layer = os.urandom(size)
    digest = fake_registry.add_blob("library/app", layer)
    path = f"/v2/library/app/blobs/{digest}"
    assert await (await group.secondary.get(path)).read() == layer
    await group.primary[SERVICES].blobs.inflight.idle()
    await group.settled()
    fake_registry.reset_counts()
    group.primary_requests.clear()
    return digest, layer, path


@pytest.mark.parametrize("served_before", [True, False])
@pytest.mark.parametrize("method, headers, status, part", [
    ("GET", {}, 200, slice(None)),
    ("HEAD", {}, 200, slice(0)),
    ("GET", {"Range": "bytes=100-199"}, 206, slice(100, 200)),
])
async def test_kind1_a_hit_evicted_while_the_secondary_checks_it_is_still_sent_whole(
        group: Group, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch,
        method: str, headers: dict[str, str], status: int, part: slice, served_before: bool) -> None:
    """A secondary that served the blob before knows its link and sends the file it opened; one
    that did not finds the link gone with the blob, and the primary fetches it again."""
    digest, layer, path = await _cached_through(group, fake_registry)
    if served_before:
        assert (await group.secondary.get(path)).headers["X-Mirror-Cache"] == "hit"
    metadata = group.secondary_app[SERVICES].blobs.metadata
    gate = Gate()
    monkeypatch.setattr(metadata.links, "contains", gate.wrap(metadata.links.contains))
    pending = asyncio.ensure_future(group.secondary.request(method, path, headers=headers))
    await asyncio.wait_for(gate.reached.wait(), BOUND)  # the secondary found the blob; its link check waits
    await evict(group.primary[SERVICES], digest)  # the primary's eviction takes it
    gate.release.set()
    resp = await asyncio.wait_for(pending, BOUND)
    assert resp.status == status and await resp.read() == layer[part]
    assert resp.headers["Docker-Content-Digest"] == digest
    assert int(resp.headers["Content-Length"]) == len(layer[part] if method == "GET" else layer)
    if served_before:
        assert resp.headers["X-Mirror-Cache"] == "hit"
        assert group.primary_requests == [] and fake_registry.count("GET") == 0
    else:
        assert resp.headers["X-Mirror-Cache"] == after_local_eviction("miss", "hit") and group.primary_requests == [path]


async def test_kind1_a_blob_stored_and_evicted_before_the_secondary_opens_it_is_fetched_again(
        group: Group, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the temp file the primary named nor the stored blob is there when the secondary
    opens them: it asks the primary for the bytes instead, and the primary fetches them anew."""
    layer = os.urandom(1 << 20)
    digest = fake_registry.add_blob("library/app", layer)
    path = f"/v2/library/app/blobs/{digest}"
    primary = group.primary[SERVICES]
    relay = follow.relay

    async def late(*args: Any) -> None:
        await primary.blobs.inflight.idle()  # the fetch is stored (its temp file renamed) ...
        await evict(primary, digest)  # ... and evicted, before the secondary opens either
        await relay(*args)

    monkeypatch.setattr(follow, "relay", late)
    resp = await asyncio.wait_for(group.secondary.get(path), BOUND)
    assert resp.status == 200 and await asyncio.wait_for(resp.read(), BOUND) == layer
    assert int(resp.headers["Content-Length"]) == len(layer) and TEMP_FILE not in resp.headers
    assert group.primary_requests == [path, path] and group.followed == [path]
    assert fake_registry.count("GET", "blob") == after_local_eviction(2, 1)
    await primary.blobs.inflight.idle()
    assert primary.blobs.store.size(digest) == len(layer)


async def test_kind2_a_client_leaving_a_followed_blob_is_counted_once_and_the_fetch_goes_on(
        group: Group, fake_registry: FakeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    layer = os.urandom(2_000_000)
    digest = fake_registry.add_blob("library/app", layer)
    path = f"/v2/library/app/blobs/{digest}"
    fake_registry.stall = stall = asyncio.Event()  # upstream sends its first chunk, then waits
    leaving = await asyncio.wait_for(group.secondary.get(path), BOUND)
    assert await asyncio.wait_for(leaving.content.readexactly(1000), BOUND) == layer[:1000]
    fetch = group.primary[SERVICES].blobs.inflight._fetches[digest]
    resp = await asyncio.wait_for(group.secondary.get(path), BOUND)  # headers: it follows the fetch
    assert fetch._readers == 2
    held = connections(group.secondary)
    leaving.close()
    await wait_until(lambda: connections(group.secondary), check=lambda n: n == held - 1, timeout=BOUND,
                     what="the secondary saw the client leave")
    stall.set()  # the next stretch goes to a closed connection
    assert resp.status == 200 and await asyncio.wait_for(resp.read(), BOUND) == layer
    await group.primary[SERVICES].blobs.inflight.idle()
    assert digest_of(group.primary[SERVICES].blobs.store.path(digest).read_bytes()) == digest
    # the primary let go of the follower that left, too
    await wait_until(lambda: fetch._readers, check=lambda n: n == 0, timeout=BOUND, what="the primary's readers")
    # one count, by the secondary: the primary does not count its follower's leaving again
    # (in one test process both workers' values land in the same multiprocess file)
    assert disconnects(group.secondary_app[SERVICES]) == 1
    assert group.followed == [path, path] and fake_registry.count("GET", "blob") == 1
    assert_quiet(caplog)
