"""Replicas of a fleet in one test: mirror apps with their own data directories sharing one bucket
of the session's S3 gateway, in front of the fake upstream."""
from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.app import make_app
from mirror.config import Config, S3Config, StorageConfig
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.integration.s3 import S3Gateway

Replica = Callable[..., Awaitable[Mirror]]


@pytest.fixture
async def replica(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client: Any, s3: S3Gateway) -> Replica:
    """Makes replicas of one fleet: each with its own data directory, all sharing one bucket prefix
    (`s3config` replaces that, `**s3_settings` override its settings, `upstream` docker.io's)."""
    shared = s3.config()
    made = 0

    async def make(s3config: S3Config | None = None, upstream: dict[str, Any] | None = None, **s3_settings: Any) -> Mirror:
        nonlocal made
        made += 1
        data_dir = tmp_path / f"replica{made}"
        bucket = dataclasses.replace(s3config or shared, **s3_settings)
        config = fleet_config(mirror_config(fake_registry.url or "", data_dir, **(upstream or {})), bucket)
        clock = FakeClock()
        app = make_app(config, clock=clock)
        return Mirror(await aiohttp_client(app), clock, app, data_dir)
    return make


def fleet_config(config: Config, bucket: S3Config) -> Config:
    return dataclasses.replace(config, storage=StorageConfig("s3", bucket))


async def settled(m: Mirror) -> None:
    """Fetches stored and published, markers written."""
    await m.services.blobs.inflight.idle()
    assert m.services.blobs.shared is not None
    await m.services.blobs.shared.idle()


