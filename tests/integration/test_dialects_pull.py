"""skopeo pulls through a real mirror process from upstreams that behave like registry.k8s.io
(a 307 to a regional registry with its own realm, then a relative hop) and like registries on
S3 (manifests and blobs on presigned storage that refuses HEAD and `Authorization`).

The dialect servers run on real loopback sockets, each in its own thread; the mirror is a
subprocess whose docker.io upstream is the dialect's front URL.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.dialects import Dialect, Servers, k8s, s3
from tests.integration.clients import Skopeo
from tests.integration.mirror_process import MirrorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIALECTS: dict[str, Callable[[Servers], Coroutine[Any, Any, Dialect]]] = {"k8s": k8s, "s3": s3}


@pytest.fixture(params=sorted(DIALECTS))
def dialect(request: pytest.FixtureRequest) -> Iterator[Dialect]:
    """A dialect served from threads on 127.0.0.1, so it answers while skopeo runs."""
    build = DIALECTS[request.param]
    running = asyncio.run(build(Servers(threaded=True)))
    yield running
    asyncio.run(running.close())


@pytest.fixture(params=[1, 2], ids=["one-worker", "two-workers"])
def dialect_mirror(dialect: Dialect, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MirrorProcess]:
    """A mirror process (one worker, or two sharing the port) whose docker.io is the dialect."""
    proc = MirrorProcess(tmp_path / "mirror", dialect.url, workers=request.param)
    proc.start()
    yield proc
    proc.stop()


def test_skopeo_pulls_by_tag_and_digest_from_the_dialect(
    skopeo_client: Skopeo, dialect: Dialect, dialect_mirror: MirrorProcess
) -> None:
    image = dialect.registry.add_image(dialect.content_repo("team/app"), "v1", 2)
    assert skopeo_client.pull(dialect_mirror.host, "team/app", "v1") == image.digest
    skopeo_client.remove_all()
    assert skopeo_client.pull(dialect_mirror.host, "team/app", image.digest) == image.digest
    dialect_mirror.wait_idle()

    registry = dialect.registry
    assert registry.count(kind="token") == 1, "one token from the realm of the host that challenged"
    assert all(r.headers.get("Authorization", "Bearer ").startswith("Bearer ") for r in registry.requests), \
        "no credential of another host reaches the registry"
    if dialect.front is not None:
        assert all("Authorization" not in r.headers for r in dialect.front.requests)
    if dialect.storage is not None:
        assert dialect.storage.authorization_headers() == []
        assert dialect.storage.count("GET") >= 3, "manifest, config and layers came from storage"

    blob_gets = registry.count("GET", "blob")
    skopeo_client.remove_all()
    assert skopeo_client.pull(dialect_mirror.host, "team/app", image.digest) == image.digest
    assert registry.count("GET", "blob") == blob_gets, "a warm pull by digest is served from the cache"
