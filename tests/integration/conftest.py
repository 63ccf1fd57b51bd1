"""Fixtures for tests against a real upstream (docker-registry + fake token server)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.token_server import TokenServer
from tests.integration.clients import (  # noqa: F401  (fixtures)
    client_drivers,
    containerd_client,
    dockerd_client,
    podman_client,
    pull_client,
    skopeo_client,
)
from tests.integration.mirror_process import MirrorProcess, mirrors
from tests.integration.prometheus import prometheus_factory  # noqa: F401  (fixture)
from tests.integration.registry import UpstreamRegistry, random_repo, registry_behind


@pytest.fixture(scope="session")
def upstream_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    """One registry and token server for the whole run: starting them costs ~1 s; tests stay
    independent by using fresh repository names (see `repo`)."""
    with registry_behind(TokenServer(), tmp_path_factory.mktemp("upstream")) as registry:
        yield registry


@pytest.fixture
def upstream(upstream_session: UpstreamRegistry) -> Iterator[UpstreamRegistry]:
    """The shared upstream, running, with token-server counters cleared; policy changes a test
    makes (users, public, private, expires_in) are undone afterwards, and a test that stopped
    the registry does not leave it down for the next one."""
    upstream_session.start()
    server = upstream_session.token_server
    saved = copy.deepcopy((server.users, server.public, server.private, server.expires_in))
    server.requests.clear()
    yield upstream_session
    server.users, server.public, server.private, server.expires_in = saved


@pytest.fixture
def repo() -> str:
    """A repository name no other test uses, e.g. `library/t1a2b3c4d5e6`."""
    return random_repo()


@pytest.fixture
def fault_proxy(upstream: UpstreamRegistry) -> Iterator[FaultProxy]:
    """A switchable reverse proxy in front of the real registry (outages, 503s, hangs, slowness)."""
    proxy = FaultProxy(upstream.url)
    proxy.start()
    yield proxy
    proxy.reset()
    proxy.stop()


@pytest.fixture
def mirror_factory(tmp_path: Path, fault_proxy: FaultProxy) -> Iterator[Callable[..., MirrorProcess]]:
    """Start mirrors (subprocesses) whose docker.io upstream is the real registry, via the fault proxy."""
    assert fault_proxy.url
    with mirrors(tmp_path, fault_proxy.url) as start:
        yield start


@pytest.fixture
def mirror_proc(mirror_factory: Callable[..., MirrorProcess]) -> MirrorProcess:
    """A running mirror with default settings (tag TTL 10 minutes)."""
    return mirror_factory()
