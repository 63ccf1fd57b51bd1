"""`/admin/`: served on the owner-only unix socket, and over TCP only with the admin token."""
from __future__ import annotations

import dataclasses
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.adminapi import ADMIN
from mirror.adminsocket import AdminSocketError, path_in
from mirror.app import make_app
from mirror.cache.admin import AdminError, perform
from mirror.config import Config, ConfigError, load
from mirror.workers.role import WorkerRole
from tests.conftest import FakeClock, Mirror, ProductionServer, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.workers.conftest import multiprocess_values  # noqa: F401  (fixture)

TOKEN = "s3cret-admin-token"


def with_token(config: Config, token: str) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, admin_token=token))


@pytest.fixture
async def guarded(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    """The mirror with `server.admin_token = TOKEN`."""
    assert fake_registry.url
    clock = FakeClock()
    app = make_app(with_token(mirror_config(fake_registry.url, tmp_path / "data"), TOKEN), clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")


async def over_socket(path: Path, method: str, target: str, **kwargs: Any) -> tuple[int, Any]:
    """One request over the unix socket at `path`: (status, JSON body)."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as session:
        async with session.request(method, f"http://localhost{target}", **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)


def error(body: dict[str, Any]) -> tuple[str, str]:
    return body["errors"][0]["code"], body["errors"][0]["message"]


async def test_the_socket_is_the_owners_alone_and_serves_admin_only(mirror: Mirror) -> None:
    path = mirror.data_dir / "admin.sock"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert os.stat(path).st_uid == os.getuid()
    status, stats = await over_socket(path, "GET", "/admin/stats")
    assert status == 200 and stats["size_bytes"] == 0 and stats["pins"] == []
    status, body = await over_socket(path, "GET", "/v2/")
    assert status == 404 and error(body)[0] == "NAME_UNKNOWN"  # nothing of the registry API
    status, body = await over_socket(path, "GET", "/metrics")
    assert status == 404
    status, body = await over_socket(path, "POST", "/admin/pin", json={"ref": "Not/Valid:x"})
    assert status == 400 and error(body)[0] == "UNSUPPORTED" and "invalid" in error(body)[1]
    status, body = await over_socket(path, "POST", "/admin/purge", data=b"[1, 2]")
    assert status == 400 and "JSON object" in error(body)[1]


async def test_tcp_without_a_token_configured_is_refused_naming_the_socket(mirror: Mirror) -> None:
    # the test client connects from 127.0.0.1: loopback opens nothing
    for method, op in (("GET", "stats"), ("POST", "gc"), ("POST", "purge")):
        resp = await mirror.client.request(method, f"/admin/{op}", json={"older_than": "0s"} if op == "purge" else None,
                                           headers={"Authorization": "Bearer anything"})
        assert resp.status == 403
        code, message = error(await resp.json())
        assert code == "DENIED"
        assert str(path_in(mirror.data_dir)) in message and "server.admin_token" in message


async def test_tcp_answers_the_right_bearer_token_only(guarded: Mirror, fake_registry: FakeRegistry) -> None:
    fake_registry.add_image("library/app", "v1", 1)
    pulled = await guarded.client.get("/v2/library/app/manifests/v1",
                                      headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert pulled.status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        resp = await guarded.client.get("/admin/stats", headers=headers)
        assert resp.status == 401, headers
        assert error(await resp.json())[0] == "UNAUTHORIZED"
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="mirror admin"'  # not the registry's token realm
    good = {"Authorization": f"Bearer {TOKEN}"}
    resp = await guarded.client.get("/admin/stats", headers=good)
    assert resp.status == 200 and (await resp.json())["objects"]["manifest"] == 1
    resp = await guarded.client.post("/admin/pin", json={"ref": "library/app:v1"}, headers=good)
    assert resp.status == 200 and await resp.json() == {"pinned": "docker.io/library/app:v1"}
    resp = await guarded.client.post("/admin/purge", json={"ref": "library/app:v1", "repo": "library/app"},
                                     headers=good)
    assert resp.status == 400 and "exactly one" in error(await resp.json())[1]
    # the socket needs no token, whatever is configured
    status, stats = await over_socket(guarded.data_dir / "admin.sock", "GET", "/admin/stats")
    assert status == 200 and stats["pins"] == ["docker.io/library/app:v1"]


@pytest.mark.parametrize("occupant", ["file", "directory"])
async def test_a_path_that_is_not_a_socket_stops_the_start_and_is_left_alone(
    fake_registry: FakeRegistry, tmp_path: Path, occupant: str, aiohttp_client  # type: ignore[no-untyped-def]
) -> None:
    assert fake_registry.url
    data_dir = tmp_path / "data"
    (data_dir / "tmp").mkdir(parents=True)
    (data_dir / "tmp" / "partial").write_bytes(b"kept")  # a start would empty tmp/
    path = data_dir / "admin.sock"
    if occupant == "file":
        path.write_bytes(b"someone's notes")
    else:
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    config = mirror_config(fake_registry.url, data_dir)
    runner = web.AppRunner(make_app(config))
    with pytest.raises(AdminSocketError, match="admin.sock exists and is not a socket"):
        await runner.setup()
    await runner.cleanup()
    if occupant == "file":
        assert path.read_bytes() == b"someone's notes"
    else:
        assert path.is_dir() and (path / "inside").read_bytes() == b"x"
    assert (data_dir / "tmp" / "partial").read_bytes() == b"kept"
    assert not (data_dir / "index.db").exists()
    # the data directory's lock went with the failed start: once the path is free, the mirror starts
    if occupant == "file":
        path.unlink()
    else:
        (path / "inside").unlink()
        path.rmdir()
    client = await aiohttp_client(make_app(config))
    assert (await client.get("/readyz")).status == 200
    assert stat.S_ISSOCK(os.stat(path).st_mode)


async def test_a_stale_socket_is_replaced_and_the_socket_goes_at_shutdown(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    assert fake_registry.url
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "admin.sock"
    with socket.socket(socket.AF_UNIX) as crashed:  # what a mirror killed with -9 leaves behind
        crashed.bind(str(path))
    path.chmod(0o777)
    with pytest.raises(aiohttp.ClientConnectorError):  # no one listens on it
        await over_socket(path, "GET", "/admin/stats")
    runner = web.AppRunner(make_app(mirror_config(fake_registry.url, data_dir)))
    await runner.setup()
    try:  # (inode numbers are reused: the mode and a listener tell the new socket from the old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (await over_socket(path, "GET", "/admin/stats"))[0] == 200
    finally:
        await runner.cleanup()
    assert not path.exists()


async def test_a_data_directory_too_long_for_a_socket_address_works(
    fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client  # type: ignore[no-untyped-def]
) -> None:
    assert fake_registry.url
    data_dir = tmp_path / ("d" * 100) / "data"
    client = await aiohttp_client(make_app(mirror_config(fake_registry.url, data_dir)))
    assert len(str(data_dir / "admin.sock")) > 108
    directory = os.open(data_dir, os.O_PATH)
    try:  # aiohttp connects by address: the same way round the limit as the mirror binds
        status, _ = await over_socket(Path(f"/proc/self/fd/{directory}/admin.sock"), "GET", "/admin/stats")
    finally:
        os.close(directory)
    assert status == 200
    await client.close()
    assert not (data_dir / "admin.sock").exists()


@pytest.fixture
async def group(fake_registry: FakeRegistry, tmp_path: Path, multiprocess_values: str,
                aiohttp_client) -> AsyncIterator[tuple[TestClient, Path]]:  # type: ignore[no-untyped-def]
    """A primary worker on its private socket and a secondary on TCP, with the admin token set."""
    assert fake_registry.url
    config = with_token(mirror_config(fake_registry.url, tmp_path / "data"), TOKEN)
    private = str(tmp_path / "primary.sock")
    secondary = make_app(config, role=WorkerRole(1, private, multiprocess_values))
    client = await aiohttp_client(ProductionServer(secondary))
    assert not (tmp_path / "data" / "admin.sock").exists()  # a secondary makes none
    runner = web.AppRunner(make_app(config, role=WorkerRole(0, private, multiprocess_values)))
    await runner.setup()
    await web.UnixSite(runner, private).start()
    yield client, tmp_path / "data" / "admin.sock"
    await runner.cleanup()


async def test_in_a_group_the_primary_serves_the_socket_and_checks_tokens_the_secondary_forwards(
    group: tuple[TestClient, Path]
) -> None:
    secondary, path = group
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert (await over_socket(path, "POST", "/admin/gc"))[0] == 200
    wrong = await secondary.get("/admin/stats", headers={"Authorization": "Bearer wrong"})
    assert wrong.status == 401 and error(await wrong.json())[0] == "UNAUTHORIZED"
    right = await secondary.get("/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status == 200 and "size_bytes" in await right.json()


@pytest.mark.parametrize("op, arguments, message", [
    ("stats", {"ref": "alpine"}, "stats takes no arguments; not ref"),
    ("pin", {}, "pin needs an image reference"),
    ("pin", {"ref": "  "}, "pin needs an image reference"),
    ("unpin", {"ref": 3}, "unpin: ref must be a string"),
    ("pin", {"ref": "alpine", "force": True}, "pin takes ref; not force"),
    ("purge", {}, "exactly one"),
    ("purge", {"older_than": "soon"}, "purge: older_than: expected a duration"),
    ("purge", {"repo": ["library/alpine"]}, "purge: repo must be a string"),
    ("compact", {}, "unknown operation 'compact'"),
])
async def test_the_dispatch_refuses_bad_arguments(mirror: Mirror, op: str, arguments: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(AdminError, match=message):
        await perform(mirror.app[ADMIN], op, arguments)


@pytest.mark.parametrize("token", ["two words", "tab\there", "naïve", "line\nbreak"])
def test_an_admin_token_that_cannot_travel_in_a_header_is_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="server.admin_token: expected printable ASCII without spaces"):
        load(env={"MIRROR_SERVER_ADMIN_TOKEN": token})
    assert load(env={"MIRROR_SERVER_ADMIN_TOKEN": "Zm9v-YmFy_0123~!"}).server.admin_token == "Zm9v-YmFy_0123~!"
