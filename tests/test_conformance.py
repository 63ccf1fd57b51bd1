"""The OCI distribution-spec conformance suite v1.1.1, pull workflow: 14 of 14 through the mirror.

The suite's content (tests/conformance.py, built as its setup.go builds it) is put in the fake
upstream, as a push to the upstream would; the specs then run against the mirror, cold (every
answer fetched) and again warm (every answer from the cache).
"""
from __future__ import annotations

import pytest

from tests.conformance import DUMMY_DIGEST, OCI_MANIFEST, PULL_SPECS, TEST_TAG, Environment, build_content, run_pull
from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry

NAMESPACE = "conformance/pull"


@pytest.fixture
def environment(mirror: Mirror, fake_registry: FakeRegistry) -> Environment:
    content = build_content()
    for blob in (*content.configs, content.layer):
        fake_registry.add_blob(NAMESPACE, blob.content)
    fake_registry.add_manifest(NAMESPACE, content.manifests[0].content, OCI_MANIFEST, TEST_TAG)
    fake_registry.add_manifest(NAMESPACE, content.manifests[1].content, OCI_MANIFEST)
    return Environment(str(mirror.client.make_url("/")), NAMESPACE, TEST_TAG, content.manifests[0].digest,
                       content.configs[0].digest)


def test_the_pull_workflow_has_14_specs() -> None:
    assert len(PULL_SPECS) == 14


async def test_kind12_conformance_pull_14_of_14_cold_and_warm(
        mirror: Mirror, fake_registry: FakeRegistry, environment: Environment) -> None:
    cold = await run_pull(environment)
    assert [failed for failed in cold if failed[1] is not None] == []
    await mirror.settled()
    fake_registry.reset_counts()
    warm = await run_pull(environment)
    assert [failed for failed in warm if failed[1] is not None] == []
    assert len(cold) == len(warm) == 14
    # warm, upstream is asked only about what it does not have (the dummy digest: no negative cache for blobs)
    assert {c.path for c in fake_registry.requests} == {f"/v2/{NAMESPACE}/blobs/{DUMMY_DIGEST}"}

async def test_kind12_conformance_pull_by_path_prefix(
        mirror: Mirror, fake_registry: FakeRegistry, environment: Environment) -> None:
    """The same, addressing the upstream by path prefix (/v2/docker.io/conformance/pull/...)."""
    env = Environment(environment.root_url, f"docker.io/{NAMESPACE}", environment.tag_name,
                      environment.manifest_digest, environment.blob_digest)
    assert [failed for failed in await run_pull(env) if failed[1] is not None] == []
