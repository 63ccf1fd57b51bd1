"""Signed schema1 images (quay.io, old Docker Hub tags) through the mirror, with a real registry
that verified their signatures on push and a real client that verifies the digest on pull."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.integration.images import push_schema1, sha256_file
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry
from tests.integration.test_pull import pull, skopeo

pytestmark = pytest.mark.integration

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def _raw(mirror: MirrorProcess, repo: str, ref: str) -> tuple[int, str, str, bytes]:
    request = urllib.request.Request(f"http://{mirror.host}/v2/{repo}/manifests/{ref}",
                                     headers={"Accept": SCHEMA1_SIGNED})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"], resp.read()


def test_kind4_signed_schema1_pulls_by_tag_and_digest_then_from_cache(
        upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, tmp_path: Path) -> None:
    image = push_schema1(upstream, repo, "old")
    for n, ref in enumerate((f"{repo}:old", f"{repo}@{image.digest}")):
        out = tmp_path / f"pull{n}"
        pull(mirror_proc, ref, out)
        manifest = json.loads((out / "manifest.json").read_bytes())
        assert manifest["schemaVersion"] == 1
        blobs = {f"sha256:{p.name}": p for p in out.iterdir() if len(p.name) == 64}
        assert set(blobs) == {b.digest for b in image.blobs}
        assert all(sha256_file(path) == digest for digest, path in blobs.items())
    status, media_type, digest, body = _raw(mirror_proc, repo, "old")
    assert (status, media_type, digest) == (200, SCHEMA1_SIGNED, image.digest)
    inspected = skopeo("inspect", "--tls-verify=false", "--no-creds", f"docker://{mirror_proc.host}/{repo}:old")
    assert inspected.returncode == 0, inspected.stderr.decode()
    assert json.loads(inspected.stdout)["Digest"] == image.digest
    assert mirror_proc.metric("mirror_digest_mismatches_total") == 0
    before = upstream.gets(repo)
    pull(mirror_proc, f"{repo}@{image.digest}", tmp_path / "again")
    assert upstream.gets(repo) == before  # by digest, every part is now a cache hit
