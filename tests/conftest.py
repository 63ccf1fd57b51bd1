"""Fixtures shared by the unit tests: a fake upstream, an injected clock, a mirror in front of them."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import RECONCILED, make_app
from mirror.config import CacheConfig, Config, ServerConfig, StorageConfig, UpstreamConfig
from mirror.observe import ACCESS_LOGGER, AccessLogger
from mirror.routes import SERVICES, Services
from mirror.server import MirrorRunner
from tests.fakes.registry import FakeRegistry
from tests.integration.s3 import S3Gateway, s3_gateway

T = TypeVar("T")
TAG_TTL = 600.0
# "s3": every mirror of the unit tests keeps its content in a bucket of the session's S3 gateway
# too (storage.backend "s3"), each under its own prefix; the suite is run once each way.
STORAGE = os.environ.get("MIRROR_TEST_STORAGE", "filesystem")
_buckets: list[S3Gateway] = []  # the gateway, once started, when STORAGE is "s3"


def after_local_eviction(filesystem: T, shared: T) -> T:
    """What a test expects of content evicted from the mirror's own disk: with the filesystem store
    it is gone, and fetched from upstream again (`filesystem`); with a fleet's bucket
    (MIRROR_TEST_STORAGE=s3) the bucket still holds it (`shared`)."""
    return shared if STORAGE == "s3" else filesystem


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Mirror:
    client: TestClient
    clock: FakeClock
    app: web.Application
    data_dir: Path

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def settled(self) -> None:
        """Wait until fetches have stored what they fetched (clients may finish before that)."""
        await self.services.blobs.inflight.idle()


class ProductionServer(TestServer):
    """An application served as `mirror serve` serves it: by MirrorRunner (the mirror's connection
    handler, which answers fresh manifest hits itself) with its access log, and a handler whose client leaves runs on
    (aiohttp's test server would cancel it, which production never does)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return MirrorRunner(self.app, **{"access_log_class": AccessLogger, "access_log": logging.getLogger(ACCESS_LOGGER),
                                         **kwargs, "handler_cancellation": False})


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Any:
    """pytest-aiohttp's `aiohttp_client`, serving an application by `ProductionServer`; a mirror's
    client is handed over once its start-up reconciliation (which runs beside serving) is done,
    so that what a test does to the store is not reconciled away under it."""
    async def client(served: Any, **kwargs: Any) -> TestClient:
        server = ProductionServer(served) if isinstance(served, web.Application) else served
        made = await aiohttp_client(server, **kwargs)
        if isinstance(app := getattr(server, "app", None), web.Application) and RECONCILED in app:
            await app[RECONCILED].wait()
        return made
    return client


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Gateway]:
    """One S3 gateway (JuiceFS) for the whole run: tests stay independent by using fresh key prefixes."""
    with s3_gateway(tmp_path_factory.mktemp("s3")) as gateway:
        yield gateway


@pytest.fixture(scope="session", autouse=STORAGE == "s3")
def storage_backend(request: pytest.FixtureRequest) -> None:
    """With MIRROR_TEST_STORAGE=s3, start the gateway `mirror_config` puts every mirror's content in."""
    if STORAGE not in ("filesystem", "s3"):
        raise pytest.UsageError(f"MIRROR_TEST_STORAGE={STORAGE!r}: expected filesystem or s3")
    if STORAGE == "s3":
        _buckets.append(request.getfixturevalue("s3"))


@pytest.fixture
async def fake_registry() -> AsyncIterator[FakeRegistry]:
    """A running fake upstream; its base URL is `fake_registry.url`."""
    registry = FakeRegistry()
    await registry.start()
    yield registry
    await registry.close()


def mirror_config(upstream_url: str, data_dir: Path, max_size: str = "80%", **upstream: object) -> Config:
    settings = {"tag_ttl": TAG_TTL, "read_timeout": 0.5, "connect_timeout": 2.0, **upstream}
    return Config(
        server=ServerConfig(data_dir=str(data_dir)),
        cache=CacheConfig(max_size=max_size),
        storage=StorageConfig("s3", _buckets[0].config()) if _buckets else StorageConfig(),
        upstreams={"docker.io": UpstreamConfig("docker.io", upstream_url, **settings)},
    )


@pytest.fixture
async def mirror(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    """The mirror app, docker.io pointing at the fake registry, on an injected clock."""
    clock = FakeClock()
    data_dir = tmp_path / "data"
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, data_dir), clock=clock)
    client = await aiohttp_client(app)
    return Mirror(client, clock, app, data_dir)


@pytest.fixture
async def ghcr() -> AsyncIterator[FakeRegistry]:
    """A second fake upstream, configured as ghcr.io by `mirror_with_ghcr`."""
    registry = FakeRegistry()
    await registry.start()
    yield registry
    await registry.close()


async def mirror_with_ghcr(fake_registry: FakeRegistry, ghcr: FakeRegistry, tmp_path: Path, aiohttp_client,  # type: ignore[no-untyped-def]
                           **ghcr_settings: object) -> Mirror:
    """The mirror with docker.io (the default, `fake_registry`) and ghcr.io (`ghcr`)."""
    assert fake_registry.url and ghcr.url
    config = mirror_config(fake_registry.url, tmp_path / "data")
    ghcr_config = UpstreamConfig("ghcr.io", ghcr.url, read_timeout=0.5, **ghcr_settings)  # type: ignore[arg-type]
    config = dataclasses.replace(config, upstreams={**config.upstreams, "ghcr.io": ghcr_config})
    clock = FakeClock()
    app = make_app(config, clock=clock)
    return Mirror(await aiohttp_client(app), clock, app, tmp_path / "data")
