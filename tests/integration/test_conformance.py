"""The OCI conformance suite v1.1.1, pull workflow, through a real mirror in front of the real registry.

The suite's content is pushed to the registry (distribution), as the suite's own setup would push
it; the 14 pull specs then run against the mirror process, cold and warm, with one worker and two.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from tests.conformance import OCI_MANIFEST, TEST_TAG, Environment, build_content, run_pull
from tests.integration.images import _Pusher
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _push_content(upstream: UpstreamRegistry, repo: str) -> Environment:
    content = build_content()
    with _Pusher(upstream, repo) as pusher, tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        for i, blob in enumerate((*content.configs, content.layer)):
            path = Path(tmp) / f"blob{i}"
            path.write_bytes(blob.content)
            pusher.push_blob(path, blob.digest, len(blob.content))
        pusher.put_manifest(TEST_TAG, OCI_MANIFEST, content.manifests[0].content)
        pusher.put_manifest(None, OCI_MANIFEST, content.manifests[1].content)
    return Environment("", repo, TEST_TAG, content.manifests[0].digest, content.configs[0].digest)


@pytest.mark.parametrize(("workers", "prefix"), [(1, ""), (2, ""), (1, "docker.io/")])
def test_kind12_conformance_pull_14_of_14_against_the_real_registry(
    upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorProcess], repo: str, workers: int, prefix: str,
) -> None:
    """OCI_NAMESPACE is the repository as clients name it: by default, or behind the docker.io prefix."""
    mirror = mirror_factory(workers=workers)
    pushed = _push_content(upstream, repo)
    env = Environment(mirror.url, prefix + pushed.namespace, pushed.tag_name, pushed.manifest_digest, pushed.blob_digest)
    for state in ("cold", "warm"):
        results = asyncio.run(run_pull(env))
        assert len(results) == 14
        assert [r for r in results if r[1] is not None] == [], state
        mirror.wait_idle()
