"""Real pulls through the mirror: skopeo against a mirror subprocess in front of distribution.

The upstream is Debian's docker-registry with token auth (the anonymous Bearer
dance of Docker Hub), reached through a fault proxy that can make it look down,
failing, hung or slow.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.integration.images import ImageKind, PushedImage, push_image, sha256_file
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry, break_upstream, require_binary
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.integration


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    cmd = [require_binary("skopeo"), "--insecure-policy", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def pull(mirror: MirrorProcess, ref: str, out: Path) -> None:
    """`skopeo copy --all` from the mirror into a `dir:` layout (keeps manifests byte for byte)."""
    done = skopeo("copy", "--all", "--src-tls-verify=false", "--src-no-creds",
                  f"docker://{mirror.host}/{ref}", f"dir:{out}")
    assert done.returncode == 0, done.stderr.decode() + "\n--- mirror log ---\n" + mirror.log_tail()


def assert_pulled(image: PushedImage, out: Path) -> None:
    assert (out / "manifest.json").read_bytes() == image.manifest
    for child in image.children:
        assert (out / f"{child.digest[7:]}.manifest.json").read_bytes() == child.manifest
    blobs = {f"sha256:{p.name}": p for p in out.iterdir() if len(p.name) == 64}
    assert set(blobs) == {b.digest for b in image.all_blobs}
    for blob in image.all_blobs:
        assert sha256_file(blobs[blob.digest]) == blob.digest


@pytest.mark.parametrize("kind", ["schema2", "oci", "list", "index"])
def test_pull_by_tag_and_digest_then_from_cache(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, kind: ImageKind, tmp_path: Path
) -> None:
    image = push_image(upstream, repo, "v1", kind=kind)
    pull(mirror_proc, f"{repo}:v1", tmp_path / "by-tag")
    assert_pulled(image, tmp_path / "by-tag")
    pull(mirror_proc, f"{repo}@{image.digest}", tmp_path / "by-digest")
    assert_pulled(image, tmp_path / "by-digest")
    before = upstream.gets(repo)
    pull(mirror_proc, f"{repo}:v1", tmp_path / "again")
    assert_pulled(image, tmp_path / "again")
    assert upstream.gets(repo) == before


def test_short_docker_hub_names_mean_library(upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str) -> None:
    image = push_image(upstream, repo, "v1")
    short = repo.removeprefix("library/")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", "--no-creds", f"docker://{mirror_proc.host}/{short}:v1")
    assert raw.returncode == 0, raw.stderr.decode()
    assert raw.stdout == image.manifest


def test_expired_tag_costs_one_head_and_no_get(
    upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorProcess], repo: str, tmp_path: Path
) -> None:
    mirror = mirror_factory(tag_ttl="0s")
    image = push_image(upstream, repo, "v1")
    pull(mirror, f"{repo}:v1", tmp_path / "first")
    gets, heads = upstream.gets(repo), upstream.count("HEAD", f"/v2/{repo}/manifests/v1", status=200)
    pull(mirror, f"{repo}:v1", tmp_path / "second")
    assert_pulled(image, tmp_path / "second")
    assert upstream.gets(repo) == gets
    assert upstream.count("HEAD", f"/v2/{repo}/manifests/v1", status=200) == heads + 1


@pytest.mark.parametrize("fault", ["stopped", "503", "hang"])
def test_cached_images_pull_while_upstream_is_out(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorProcess],
    repo: str, fault: str, tmp_path: Path,
) -> None:
    mirror = mirror_factory(tag_ttl="0s", read_timeout="1s")
    image = push_image(upstream, repo, "v1", kind="list")
    pull(mirror, f"{repo}:v1", tmp_path / "warm")
    break_upstream(fault, upstream, fault_proxy)
    for ref in (f"{repo}:v1", f"{repo}@{image.digest}"):
        out = tmp_path / ref.replace(":", "_").replace("/", "_").replace("@", "_")
        pull(mirror, ref, out)
        assert_pulled(image, out)
    assert mirror.metric("mirror_stale_served_total", upstream="docker.io",
                         reason="5xx" if fault == "503" else "unreachable") >= 1


def test_uncached_image_during_outage_gets_a_clear_error(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_proc: MirrorProcess, repo: str
) -> None:
    fault_proxy.status = 503
    req = urllib.request.Request(f"{mirror_proc.url}/v2/{repo}/manifests/v1")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 502
    body = json.loads(caught.value.read())
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "503" in body["errors"][0]["message"] or "injected" in body["errors"][0]["message"]


def _get_sha256(url: str) -> str:
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def test_concurrent_cold_gets_make_one_upstream_get(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_proc: MirrorProcess, repo: str
) -> None:
    image = push_image(upstream, repo, "v1", big_layer=True, layers=1)
    big = max(image.all_blobs, key=lambda b: b.size)
    url = f"{mirror_proc.url}/v2/{repo}/blobs/{big.digest}"
    fault_proxy.delay = 0.002  # a streaming upstream slow enough for every client to arrive mid-fetch
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        digests = list(pool.map(_get_sha256, [url] * 20))
    assert digests == [big.digest] * 20
    assert upstream.count("GET", f"/v2/{repo}/blobs/{big.digest}", status=200) == 1


def test_kill_9_mid_fetch_leaves_nothing_partial(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_proc: MirrorProcess, repo: str, tmp_path: Path
) -> None:
    image = push_image(upstream, repo, "v1", big_layer=True, layers=1)
    big = max(image.all_blobs, key=lambda b: b.size)
    fault_proxy.delay = 0.01
    reader = threading.Thread(target=lambda: _try_get(f"{mirror_proc.url}/v2/{repo}/blobs/{big.digest}"), daemon=True)
    reader.start()
    tmp = mirror_proc.data_dir / "tmp"
    wait_until_sync(lambda: [p.name for p in tmp.iterdir() if p.stat().st_size > 0], timeout=30,
                    what="a temp file with bytes in it")
    mirror_proc.kill()
    content = mirror_proc.data_dir / "content" / "sha256" / big.digest[7:9] / big.digest[7:]
    assert not content.exists()
    fault_proxy.delay = 0
    mirror_proc.start()
    assert list(tmp.iterdir()) == []
    pull(mirror_proc, f"{repo}:v1", tmp_path / "after")
    assert_pulled(image, tmp_path / "after")
    mirror_proc.wait_idle()
    assert content.exists()


def _try_get(url: str) -> None:
    try:
        _get_sha256(url)
    except OSError:
        pass  # the mirror was killed under it
