"""skopeo, podman, containerd and dockerd pull through the mirror, configured as users configure them.

The mirror runs as a subprocess mirroring docker.io; its upstream is the real
registry (distribution, token auth) behind the fault proxy. The clients cannot
reach any real registry, so each pull below went through the mirror.
"""
from __future__ import annotations

import threading
from typing import Callable

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.integration.clients import Client, Dockerd
from tests.integration.images import ImageKind, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry, break_upstream

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["schema2", "oci", "list", "index"])
def test_client_pulls_by_tag_and_digest(
    pull_client: Client, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, kind: ImageKind
) -> None:
    image = push_image(upstream, repo, "v1", kind=kind)
    assert pull_client.pull(mirror_proc.host, repo, "v1") == image.digest
    pull_client.remove_all()
    gets = upstream.gets(repo)
    assert pull_client.pull(mirror_proc.host, repo, image.digest) == image.digest
    pull_client.remove_all()
    assert pull_client.pull(mirror_proc.host, repo, "v1") == image.digest
    assert upstream.gets(repo) == gets, "a second pull must be served from the cache"


@pytest.mark.parametrize("fault", ["stopped", "503", "hang"])
def test_cached_image_pulls_while_upstream_is_out(
    pull_client: Client, upstream: UpstreamRegistry, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorProcess], repo: str, fault: str,
) -> None:
    mirror = mirror_factory(tag_ttl="0s", read_timeout="1s")  # every tag pull must ask upstream
    image = push_image(upstream, repo, "v1", kind="index")
    assert pull_client.pull(mirror.host, repo, "v1") == image.digest
    pull_client.remove_all()
    break_upstream(fault, upstream, fault_proxy)
    assert pull_client.pull(mirror.host, repo, "v1") == image.digest
    pull_client.remove_all()
    assert pull_client.pull(mirror.host, repo, image.digest) == image.digest


def test_big_layer_pulls_intact(pull_client: Client, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str) -> None:
    image = push_image(upstream, repo, "v1", big_layer=True, layers=1)
    assert pull_client.pull(mirror_proc.host, repo, "v1") == image.digest


def test_upstream_breaking_mid_body_then_retry_gives_correct_bytes(
    dockerd_client: Dockerd, upstream: UpstreamRegistry, fault_proxy: FaultProxy,
    mirror_factory: Callable[..., MirrorProcess], repo: str,
) -> None:
    mirror = mirror_factory(read_timeout="1s")
    image = push_image(upstream, repo, "v1", big_layer=True, layers=1)
    fault_proxy.delay = 0.0001
    threading.Timer(0.5, lambda: setattr(fault_proxy, "delay", 3.0)).start()  # stalls mid-body
    threading.Timer(4.0, lambda: setattr(fault_proxy, "delay", 0.0)).start()
    dockerd_client.max_download_attempts = 3  # Docker's retry resumes with a Range request
    try:
        assert dockerd_client.pull(mirror.host, repo, "v1") == image.digest
    finally:
        dockerd_client.max_download_attempts = 1
