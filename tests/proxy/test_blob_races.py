"""Blobs under churn: eviction between the check and the send, clients that leave mid-body.

Every race is driven by events the test holds (a check that waits, a sendfile that
waits, a stalled upstream), never by sleeps. The mirror is served as `mirror serve`
serves it: a client that leaves does not cancel its handler, which then meets the
closed connection in the middle of sending.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from mirror.app import make_app
from mirror.observe import metrics_middleware
from mirror.responses import sending
from mirror.requestinfo import KIND
from mirror.routes import SERVICES, Services
from tests.byteranges import parse_byteranges
from tests.conftest import FakeClock, Mirror, ProductionServer, after_local_eviction, mirror_config
from tests.fakes.registry import FakeRegistry, digest_of
from tests.waiting import wait_until

BOUND = 10.0  # seconds any one wait of these tests may take; they finish in well under one


@pytest.fixture
async def mirror(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data"), clock=clock)
    return Mirror(await aiohttp_client(ProductionServer(app)), clock, app, tmp_path / "data")


class Gate:
    """Holds every call of the coroutine functions it wraps until `release` is set."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def wrap(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def held(*args: Any, **kwargs: Any) -> Any:
            self.reached.set()
            await self.release.wait()
            return await fn(*args, **kwargs)
        return held


async def evict(services: Services, digest: str) -> None:
    """What `Evictor.remove` does to one blob: its rows first, then its file."""
    await services.blobs.metadata.drop_content([digest])
    services.blobs.store.remove(digest)


async def cached(mirror: Mirror, fake: FakeRegistry, size: int = 300_000) -> tuple[str, bytes, str]:
    """A blob pulled once and stored: (digest, bytes, its URL)."""
    data = os.urandom(size)
    digest = fake.add_blob("library/app", data)
    url = f"/v2/library/app/blobs/{digest}"
    assert await (await mirror.client.get(url)).read() == data
    await mirror.settled()
    await mirror.services.blobs.metadata.flush()
    fake.reset_counts()
    return digest, data, url


def connections(client: TestClient) -> int:
    """Open client connections of the server (one closes when the server has seen its client leave)."""
    assert client.server.runner is not None and client.server.runner.server is not None
    return sum(1 for handler in client.server.runner.server.connections  # type: ignore[attr-defined]
               if handler.transport is not None)


def disconnects(services: Services) -> float:
    return services.metrics.client_disconnects.labels("blob")._value.get()


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing above debug about a client that left, and no traceback at all."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


# -- kind 1: a blob evicted between the check and the send ---------------------------------------

# (request headers, method, expected status, expected body as a function of the blob)
ASKS = {
    "get": ({}, "GET", 200, lambda data: data),
    "head": ({}, "HEAD", 200, lambda data: b""),
    "range": ({"Range": "bytes=100-199"}, "GET", 206, lambda data: data[100:200]),
    "ranges": ({"Range": "bytes=0-9,-10"}, "GET", 206, None),
    "if-none-match": (None, "GET", 304, lambda data: b""),
}


@pytest.mark.parametrize("check", ["access", "link"])
@pytest.mark.parametrize("ask", list(ASKS))
async def test_kind1_a_blob_evicted_while_its_checks_wait_is_still_sent_whole(
        mirror: Mirror, fake_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch, ask: str, check: str) -> None:
    digest, data, url = await cached(mirror, fake_registry)
    headers, method, status, body = ASKS[ask]
    if headers is None:
        headers = {"If-None-Match": f'"{digest}"'}
    blobs = mirror.services.blobs
    gate = Gate()
    if check == "access":
        monkeypatch.setattr(blobs.access, "ensure", gate.wrap(blobs.access.ensure))
    else:
        monkeypatch.setattr(blobs.metadata.links, "contains", gate.wrap(blobs.metadata.links.contains))
    pending = asyncio.ensure_future(mirror.client.request(method, url, headers=headers))
    await asyncio.wait_for(gate.reached.wait(), BOUND)  # the blob was found; its check waits
    await evict(mirror.services, digest)
    assert blobs.store.size(digest) is None
    gate.release.set()
    resp = await asyncio.wait_for(pending, BOUND)
    got = await resp.read()
    assert resp.status == status
    assert resp.headers["Docker-Content-Digest"] == digest and resp.headers["ETag"] == f'"{digest}"'
    if body is None:
        assert parse_byteranges(resp.headers["Content-Type"], got) == [
            ("application/octet-stream", f"bytes 0-9/{len(data)}", data[:10]),
            ("application/octet-stream", f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}", data[-10:])]
    else:
        assert got == body(data)
    if status != 304:
        assert int(resp.headers["Content-Length"]) == (len(got) if method == "GET" else len(data))
    assert resp.headers["X-Mirror-Cache"] == "hit"  # from the file the request had opened ...
    assert fake_registry.count("GET") == 0  # ... not fetched again


async def test_kind1_a_blob_evicted_before_it_is_opened_is_fetched_again(
        mirror: Mirror, fake_registry: FakeRegistry) -> None:
    digest, data, url = await cached(mirror, fake_registry)
    await evict(mirror.services, digest)
    for method, want in (("HEAD", b""), ("GET", data)):
        resp = await mirror.client.request(method, url)
        assert resp.status == 200 and await resp.read() == want
        assert int(resp.headers["Content-Length"]) == len(data)
        assert resp.headers["X-Mirror-Cache"] == after_local_eviction("miss", "hit")
    assert fake_registry.count("GET", "blob") == after_local_eviction(1, 0)
    await mirror.settled()
    assert mirror.services.blobs.store.size(digest) == len(data)


async def test_kind1_a_miss_that_waited_on_its_access_check_joins_the_fetch_begun_meanwhile(
        fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """With a service account, an anonymous miss checks access before it may fetch: a request
    that found nothing (say, just evicted) and waited there joins the fetch another began."""
    assert fake_registry.url
    fake_registry.users = {"svc": "svc-pw"}
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data", username="svc", password="svc-pw"))
    client = await aiohttp_client(ProductionServer(app))
    data = os.urandom(300_000)
    digest = fake_registry.add_blob("library/app", data)
    url = f"/v2/library/app/blobs/{digest}"
    blobs = app[SERVICES].blobs
    gate = Gate()
    real_ensure = blobs.access.ensure
    monkeypatch.setattr(blobs.access, "ensure", gate.wrap(real_ensure))
    fake_registry.stall = stall = asyncio.Event()
    waiting = asyncio.ensure_future(client.get(url))
    await asyncio.wait_for(gate.reached.wait(), BOUND)  # found nothing; checks access
    monkeypatch.setattr(blobs.access, "ensure", real_ensure)
    first = await asyncio.wait_for(client.get(url), BOUND)  # another request starts the fetch
    assert first.headers["X-Mirror-Cache"] == "miss"
    gate.release.set()
    second = await asyncio.wait_for(waiting, BOUND)
    assert second.headers["X-Mirror-Cache"] == "coalesced"
    stall.set()
    assert await first.read() == data and await second.read() == data
    assert fake_registry.count("GET", "blob") == 1


# -- kind 2: a client that leaves while its blob is being sent -----------------------------------

async def test_kind2_a_client_leaving_during_sendfile_of_a_growing_file(
        mirror: Mirror, fake_registry: FakeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = os.urandom(2_000_000)
    digest = fake_registry.add_blob("library/app", data)
    url = f"/v2/library/app/blobs/{digest}"
    fake_registry.stall = stall = asyncio.Event()  # upstream sends its first chunk, then waits
    leaving = await mirror.client.get(url)
    assert await asyncio.wait_for(leaving.content.readexactly(1000), BOUND) == data[:1000]
    resp = await asyncio.wait_for(mirror.client.get(url), BOUND)  # headers: it joined the fetch
    assert resp.headers["X-Mirror-Cache"] == "coalesced"
    held = connections(mirror.client)
    leaving.close()
    await wait_until(lambda: connections(mirror.client), check=lambda n: n == held - 1,
                     timeout=BOUND, what="the mirror saw the client leave")
    stall.set()  # its handler now sends the next bytes to a closed connection
    assert resp.status == 200 and await asyncio.wait_for(resp.read(), BOUND) == data
    await mirror.settled()
    stored = mirror.services.blobs.store.path(digest)
    assert digest_of(stored.read_bytes()) == digest
    await wait_until(lambda: disconnects(mirror.services), check=lambda n: n == 1, timeout=BOUND,
                     what="departures counted")
    assert fake_registry.count("GET", "blob") == 1
    assert any(r.name == "mirror.clients" and r.levelno == logging.DEBUG for r in caplog.records)
    assert_quiet(caplog)


@pytest.mark.parametrize("ask", [{}, {"Range": "bytes=10-99999"}, {"Range": "bytes=0-9,100-99999"}])
async def test_kind2_a_client_leaving_during_sendfile_of_a_hit(
        mirror: Mirror, fake_registry: FakeRegistry, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, ask: dict[str, str]) -> None:
    caplog.set_level(logging.DEBUG)
    digest, data, url = await cached(mirror, fake_registry)
    loop = asyncio.get_running_loop()
    gate = Gate()
    monkeypatch.setattr(loop, "sendfile", gate.wrap(loop.sendfile))
    held = connections(mirror.client)
    leaving = asyncio.ensure_future(mirror.client.get(url, headers=ask))
    await asyncio.wait_for(gate.reached.wait(), BOUND)  # headers are out; the body is about to go
    (await asyncio.wait_for(leaving, BOUND)).close()
    await wait_until(lambda: connections(mirror.client), check=lambda n: n == held, timeout=BOUND,
                     what="the mirror saw the client leave")
    gate.release.set()  # sendfile meets a closed transport ("Transport is closing")
    await wait_until(lambda: disconnects(mirror.services), check=lambda n: n == 1, timeout=BOUND,
                     what="departures counted")
    monkeypatch.undo()
    resp = await mirror.client.get(url)
    assert resp.headers["X-Mirror-Cache"] == "hit" and await resp.read() == data
    assert_quiet(caplog)


class _Transport:
    """As much of an asyncio transport as `send_file` asks about."""

    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True


@pytest.mark.parametrize("raised, closes, gone", [
    (RuntimeError("Transport is closing"), True, True),  # asyncio's word for a transport that is closing
    (ConnectionResetError("reset"), False, True),
    (BrokenPipeError("broken pipe"), False, True),
    (OSError(9, "bad file descriptor"), True, True),  # the socket closed under the copy
    (OSError(5, "input/output error"), False, False),  # reading the file failed: a fault, not a departure
    (RuntimeError("sendfile is not supported"), False, False),
])
async def test_kind2_send_file_tells_a_departure_from_a_fault(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raised: BaseException, closes: bool, gone: bool) -> None:
    transport = _Transport()
    request = SimpleNamespace(transport=transport)

    async def sendfile(*args: object) -> None:
        transport.closing = closes
        raise raised

    monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", sendfile)
    path = tmp_path / "blob"
    path.write_bytes(b"x")
    with path.open("rb") as file, pytest.raises(type(raised) if not gone else sending.ClientGone) as info:
        await sending.send_file(request, file, 0, 1)  # type: ignore[arg-type]
    assert (info.value is raised) != gone
    assert transport.closing == (gone or closes)  # a connection whose body broke off is not used again


async def test_kind2_a_client_leaving_a_small_answer_is_counted_by_the_middleware(mirror: Mirror) -> None:
    """Answers the middleware sends itself (manifests, errors) count a departure the same way."""
    class Gone(web.Response):
        async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
            raise ConnectionResetError("Cannot write to closing transport")

    async def handler(request: web.Request) -> web.StreamResponse:
        request[KIND] = "manifest"
        return Gone(body=b"{}")

    request = make_mocked_request("GET", "/v2/library/app/manifests/1", app=mirror.app)
    await metrics_middleware(request, handler)
    await metrics_middleware(request, handler)  # once per request, however often it is noticed
    counter = mirror.services.metrics.client_disconnects.labels("manifest")
    assert counter._value.get() == 1
