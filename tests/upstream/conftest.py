"""Fixtures for the upstream dialects: running dialects and a mirror in front of one."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.app import make_app
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.dialects import Dialect, Servers, docker_hub, k8s, s3

MirrorFor = Callable[..., Awaitable[Mirror]]


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Serves the apps a test builds, in its event loop; all stopped afterwards."""
    running = Servers()
    yield running
    await running.close()


@pytest.fixture
async def hub(servers: Servers) -> Dialect:
    return await docker_hub(servers)


@pytest.fixture
async def k8s_registry(servers: Servers) -> Dialect:
    return await k8s(servers)


@pytest.fixture
async def s3_registry(servers: Servers) -> Dialect:
    return await s3(servers)


@pytest.fixture
def mirror_for(tmp_path: Path, aiohttp_client) -> MirrorFor:  # type: ignore[no-untyped-def]
    """`await mirror_for(url, **upstream settings)`: the mirror app, docker.io pointing at `url`,
    on an injected clock (as the `mirror` fixture, for any upstream)."""

    async def start(url: str, **upstream: Any) -> Mirror:
        clock = FakeClock()
        data_dir = tmp_path / f"data{len(list(tmp_path.glob('data*')))}"
        app = make_app(mirror_config(url, data_dir, **upstream), clock=clock)
        return Mirror(await aiohttp_client(app), clock, app, data_dir)

    return start
