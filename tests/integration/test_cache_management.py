"""Cache management as an operator meets it: warm-up, size cap, pins, stats, purge, gc, crashes.

The mirror runs as a subprocess in front of the real registry; the commands run
as `python -m mirror …` subprocesses, against the running server (through its
admin socket, or over TCP with the admin token) or against the data directory of
a stopped one.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.integration.clients import Skopeo
from tests.integration.images import PushedImage, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry, random_repo
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.integration


def mirror_cmd(mirror: MirrorProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ARGS --config <the mirror's config>` (not a terminal: plain progress lines)."""
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(mirror.config)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_warm_then_pulls_make_no_upstream_gets(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, skopeo_client: Skopeo, tmp_path: Path
) -> None:
    images = [push_image(upstream, random_repo(), "v1", kind=kind) for kind in ("schema2", "index")]
    refs = tmp_path / "refs.txt"
    refs.write_text("# images for the morning rush\n" + "\n".join(f"{i.repo}:v1" for i in images) + "\n")
    done = mirror_cmd(mirror_proc, "warm", "--file", str(refs), "--jobs", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "2 pulled, 0 already cached, 0 failed" in done.stdout
    assert "[2/2]" in done.stderr  # plain progress lines when not on a terminal
    before = {i.repo: upstream.gets(i.repo) for i in images}
    for image in images:
        assert skopeo_client.pull(mirror_proc.host, image.repo, "v1") == image.digest
        assert upstream.gets(image.repo) == before[image.repo], "a warmed image went upstream"
    again = mirror_cmd(mirror_proc, "warm", f"{images[0].repo}:v1")
    assert again.returncode == 0 and "0 pulled, 1 already cached" in again.stdout


def test_warm_reports_failures_and_exits_nonzero(upstream: UpstreamRegistry, mirror_proc: MirrorProcess) -> None:
    image = push_image(upstream, random_repo(), "v1", kind="list")
    done = mirror_cmd(mirror_proc, "warm", f"{image.repo}:v1", f"{random_repo()}:nope", "--platform", "linux/amd64")
    assert done.returncode == 1
    assert "1 pulled, 0 already cached, 1 failed" in done.stdout
    assert ":nope: " in done.stdout and "404" in done.stdout


def _pull_all(mirror: MirrorProcess, skopeo: Skopeo, images: list[PushedImage]) -> None:
    for image in images:
        assert skopeo.pull(mirror.host, image.repo, "v1") == image.digest


def _wait_under(mirror: MirrorProcess, cap: int) -> float:
    return wait_until_sync(lambda: mirror.metric("mirror_cache_size_bytes"), check=lambda size: 0 < size <= cap,
                           timeout=30, interval=0.2, what=f"cache size within the cap of {cap} bytes")


def test_size_cap_keeps_pinned_and_recent_images_and_evicts_whole_ones(
    upstream: UpstreamRegistry, mirror_factory: Callable[..., MirrorProcess], skopeo_client: Skopeo,
) -> None:
    cap = 12 << 20
    mirror = mirror_factory(extra=f'[cache]\nmax_size = "{cap}B"\n'.replace("[cache]", "\n[cache]"))
    images = [push_image(upstream, random_repo(), "v1", layers=2, layer_size=2 << 20) for _ in range(9)]  # ~36 MiB
    _pull_all(mirror, skopeo_client, images[:1])
    assert mirror_cmd(mirror, "cache", "pin", f"{images[0].repo}:v1").returncode == 0
    for image in images[1:]:
        _pull_all(mirror, skopeo_client, [image])
        mirror.wait_idle()
        _wait_under(mirror, cap)
    stats = json.loads(mirror_cmd(mirror, "cache", "stats", "--json").stdout)
    assert stats["size_bytes"] <= cap and stats["max_bytes"] == cap
    assert stats["pins"] == [f"docker.io/{images[0].repo}:v1"]
    data = mirror.data_dir / "content" / "sha256"
    present = {p.name for p in data.glob("*/*")}
    for image in images:
        held = {b.digest[7:] in present for b in image.all_blobs} | {image.digest[7:] in present}
        assert len(held) == 1, f"{image.repo} was evicted in part"
    assert images[0].digest[7:] in present, "the pinned image was evicted"
    assert images[-1].digest[7:] in present, "the most recent image was evicted"
    assert mirror.metric("mirror_evictions_total") > 0
    for image in (images[0], images[-1]):
        gets = upstream.gets(image.repo)
        assert skopeo_client.pull(mirror.host, image.repo, "v1") == image.digest
        assert upstream.gets(image.repo) == gets


def test_stats_pin_purge_and_gc_on_a_running_and_a_stopped_mirror(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, skopeo_client: Skopeo,
) -> None:
    keep, drop = (push_image(upstream, random_repo(), "v1") for _ in range(2))
    _pull_all(mirror_proc, skopeo_client, [keep, drop])
    mirror_proc.wait_idle()
    stats = json.loads(mirror_cmd(mirror_proc, "cache", "stats", "--json").stdout)
    assert stats["objects"]["manifest"] == 2 and stats["hit_ratio"] is not None
    assert {r["repository"] for r in stats["top_by_size"]} == {f"docker.io/{keep.repo}", f"docker.io/{drop.repo}"}
    assert mirror_cmd(mirror_proc, "cache", "purge", f"{drop.repo}:v1").returncode == 0
    assert not (mirror_proc.data_dir / "content" / "sha256" / drop.digest[7:9] / drop.digest[7:]).exists()
    mirror_proc.stop()
    assert not (mirror_proc.data_dir / "admin.sock").exists()
    # the same commands work on the data directory of a stopped mirror
    human = mirror_cmd(mirror_proc, "cache", "stats")
    assert human.returncode == 0 and "1 manifests" in human.stdout
    assert mirror_cmd(mirror_proc, "cache", "pin", f"{keep.repo}@{keep.digest}").returncode == 0
    (mirror_proc.data_dir / "tmp" / "leftover").write_bytes(b"x")
    gc = mirror_cmd(mirror_proc, "cache", "gc")
    assert gc.returncode == 0 and "removed_temp_files: 1" in gc.stdout
    assert mirror_cmd(mirror_proc, "cache", "purge", "--older-than", "0s").returncode == 0
    assert (mirror_proc.data_dir / "content" / "sha256" / keep.digest[7:9] / keep.digest[7:]).exists(), "pinned"
    assert mirror_cmd(mirror_proc, "cache", "unpin", f"{keep.repo}@{keep.digest}").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["cache", "pin", "Not/Valid:ref"], "invalid"),
    (["cache", "pin", "library/never-pulled:1"], "not cached"),
    (["cache", "unpin", "library/never-pulled:1"], "not pinned"),
    (["cache", "purge", "--older-than", "soon"], "older-than"),
    (["cache", "purge"], "exactly one"),
])
def test_bad_input_is_refused_and_changes_nothing(mirror_proc: MirrorProcess, args: list[str], message: str) -> None:
    before = sorted(p.name for p in mirror_proc.data_dir.rglob("*") if p.is_file() and "index.db" not in p.name)
    done = mirror_cmd(mirror_proc, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert sorted(p.name for p in mirror_proc.data_dir.rglob("*") if p.is_file() and "index.db" not in p.name) == before


def test_not_a_data_directory_and_a_newer_schema_are_refused(mirror_proc: MirrorProcess, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mirror", "cache", "stats", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a mirror data directory" in done.stderr
    mirror_proc.stop()
    db = sqlite3.connect(mirror_proc.data_dir / "index.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    done = mirror_cmd(mirror_proc, "cache", "stats")
    assert done.returncode == 2 and "schema version 99" in done.stderr


def test_kill_9_during_20_fetches_then_gc(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_proc: MirrorProcess, skopeo_client: Skopeo,
) -> None:
    images = [push_image(upstream, random_repo(), "v1", layers=1, layer_size=3 << 20) for _ in range(20)]
    done_first = images[:5]
    _pull_all(mirror_proc, skopeo_client, done_first)  # these complete before the crash
    mirror_proc.wait_idle()
    fault_proxy.delay = 0.02  # the other 15 stream slowly: the crash lands mid-fetch
    readers = [threading.Thread(target=_quietly_get, daemon=True,
                                args=(f"{mirror_proc.url}/v2/{i.repo}/blobs/{i.all_blobs[-1].digest}",))
               for i in images[5:]]
    for r in readers:
        r.start()
    wait_until_sync(lambda: len(list((mirror_proc.data_dir / "tmp").iterdir())), check=lambda n: n >= 10,
                    timeout=30, what="ten fetches writing temp files")
    mirror_proc.kill()
    assert (mirror_proc.data_dir / "admin.sock").is_socket()  # left behind, stale
    gc = mirror_cmd(mirror_proc, "cache", "gc")
    assert gc.returncode == 0, gc.stderr
    content = mirror_proc.data_dir / "content" / "sha256"
    for path in content.glob("*/*"):  # nothing partial: every file hashes to its name
        assert subprocess.run(["sha256sum", str(path)], capture_output=True, text=True).stdout.startswith(path.name)
    assert list((mirror_proc.data_dir / "tmp").iterdir()) == []
    fault_proxy.delay = 0
    mirror_proc.start()
    for image in done_first:  # nothing that had completed was lost
        gets = upstream.gets(image.repo)
        assert skopeo_client.pull(mirror_proc.host, image.repo, "v1") == image.digest
        assert upstream.gets(image.repo) == gets
    _pull_all(mirror_proc, skopeo_client, images[5:])
    stats = mirror_cmd(mirror_proc, "cache", "stats", "--json")  # the restarted mirror replaced the stale socket
    assert stats.returncode == 0 and json.loads(stats.stdout)["objects"]["manifest"] == 20, stats.stderr


def test_the_admin_api_answers_over_tcp_only_with_the_token(
    mirror_factory: Callable[..., MirrorProcess], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("MIRROR_SERVER_ADMIN_TOKEN", "t0ken-for-tcp")  # the mirror's and the commands' setting
    mirror = mirror_factory()
    refused = urllib.request.Request(f"{mirror.url}/admin/stats")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(refused, timeout=10)
    assert caught.value.code == 401  # loopback is no credential
    done = mirror_cmd(mirror, "cache", "stats", "--json", "--url", mirror.url)
    assert done.returncode == 0 and json.loads(done.stdout)["size_bytes"] == 0, done.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("guess\n")
    done = mirror_cmd(mirror, "cache", "gc", "--url", mirror.url, "--admin-token-file", str(wrong))
    assert done.returncode == 2 and "the admin token is missing or wrong" in done.stderr
    monkeypatch.delenv("MIRROR_SERVER_ADMIN_TOKEN")
    done = mirror_cmd(mirror, "cache", "stats")  # over the socket: no token needed
    assert done.returncode == 0, done.stderr


def _quietly_get(url: str) -> None:
    try:
        token = json.loads(urllib.request.urlopen(url.split("/v2/")[0] + "/token", timeout=10).read())["token"]
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            while resp.read(1 << 16):
                pass
    except OSError:
        pass  # the mirror was killed under it
