"""`server.workers = 2`: a supervisor and two worker processes sharing the port, against the real registry.

Connections spread over the workers by the kernel (SO_REUSEPORT), so each test
uses many connections and checks that both workers answered.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.images import push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.integration

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def group(mirror_factory: Callable[..., MirrorProcess]) -> MirrorProcess:
    mirror = mirror_factory(workers=2)
    wait_for_workers(mirror, 2)
    return mirror


def wait_for_workers(mirror: MirrorProcess, count: int) -> None:
    """/readyz answers once the primary does; the secondary is forked after that."""
    wait_until_sync(mirror.workers, check=lambda pids: len(pids) == count, timeout=20, what=f"{count} workers")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (so the kernel may pick either worker)."""
    request = urllib.request.Request(url, headers={"Connection": "close", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def many(count: int, fn: Callable[[int], tuple[int, dict[str, str], bytes]]) -> list[tuple[int, dict[str, str], bytes]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(fn, range(count)))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def served_by(mirror: MirrorProcess, path_part: str) -> set[int]:
    """The workers that received requests for `path_part` from clients (answered or handed over)."""
    return {int(m.group(2) or m.group(1)) for line in mirror.log.read_text().splitlines()
            if "mirror.access" in line and path_part in line
            and (m := re.search(r" worker (\d+)(?: from (\d+))?$", line))}


def wait_served_by_both(mirror: MirrorProcess, path_part: str) -> None:
    """Until both workers logged requests for `path_part` (access-log lines are written in batches)."""
    wait_until_sync(lambda: served_by(mirror, path_part), check=lambda workers: workers == {0, 1}, timeout=5,
                    what=f"workers that logged {path_part}")


def test_one_upstream_fetch_for_concurrent_cold_gets_over_both_workers(
    group: MirrorProcess, upstream: UpstreamRegistry, repo: str
) -> None:
    image = push_image(upstream, repo, "v1", layers=1, big_layer=True)
    big = max(image.blobs, key=lambda b: b.size)
    results = many(20, lambda _: get(f"{group.url}/v2/{repo}/blobs/{big.digest}"))
    assert all(status == 200 for status, _, _ in results)
    assert all(f"sha256:{hashlib.sha256(body).hexdigest()}" == big.digest for _, _, body in results)
    assert upstream.count("GET", f"/blobs/{big.digest}", status=200) == 1
    wait_served_by_both(group, big.digest)
    group.wait_idle()
    results = many(10, lambda _: get(f"{group.url}/v2/{repo}/blobs/{big.digest}"))  # now hits, on both
    assert {headers["X-Mirror-Cache"] for _, headers, _ in results} == {"hit"}


def test_a_token_issued_by_one_worker_is_honoured_by_the_other(
    group: MirrorProcess, upstream: UpstreamRegistry, repo: str
) -> None:
    image = push_image(upstream, repo, "v1", layers=1)
    status, _, body = get(f"{group.url}/token?scope=repository:{repo}:pull&service=mirror")
    assert status == 200
    token = json.loads(body)["token"]
    auth = {"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT}
    results = many(20, lambda _: get(f"{group.url}/v2/{repo}/manifests/v1", auth))
    assert [status for status, _, _ in results] == [200] * 20
    assert {headers["Docker-Content-Digest"] for _, headers, _ in results} == {image.digest}
    wait_served_by_both(group, f"/v2/{repo}/manifests/v1")
    forged = {"Authorization": f"Bearer {token[:-4]}AAAA", "Accept": MANIFEST_ACCEPT}
    assert {status for status, _, _ in many(6, lambda _: get(f"{group.url}/v2/{repo}/manifests/v1", forged))} == {401}


def test_metrics_add_up_over_the_workers(group: MirrorProcess, upstream: UpstreamRegistry, repo: str) -> None:
    push_image(upstream, repo, "v1", layers=1)
    results = many(24, lambda _: get(f"{group.url}/v2/{repo}/manifests/v1", {"Accept": MANIFEST_ACCEPT}))
    assert all(status == 200 for status, _, _ in results)
    wait_served_by_both(group, f"/v2/{repo}/manifests/v1")
    counted = [sum(group.metric("mirror_requests_total", kind="manifest", method="GET", result=result)
                   for result in ("hit", "miss", "coalesced")) for _ in range(6)]  # scrapes land on both workers
    assert counted == [24] * 6


def test_a_worker_that_dies_is_replaced_and_hits_go_on_meanwhile(
    group: MirrorProcess, upstream: UpstreamRegistry, repo: str
) -> None:
    push_image(upstream, repo, "v1", layers=1)
    url = f"{group.url}/v2/{repo}/manifests/v1"
    assert get(url, {"Accept": MANIFEST_ACCEPT})[0] == 200
    primary, secondary = group.workers()
    os.kill(primary, signal.SIGKILL)  # misses wait for its replacement; cached tags are still served
    answered = [status for status, _, _ in many(10, lambda _: get(url, {"Accept": MANIFEST_ACCEPT}))]
    assert answered.count(200) >= 1 and set(answered) <= {200, 503}
    workers = wait_until_sync(group.workers, check=lambda pids: len(pids) == 2 and primary not in pids,
                              timeout=20, interval=0.1, what="a replacement worker")
    assert secondary in workers
    wait_until_sync(lambda: "restarting it" in group.log.read_text(), timeout=5, what="the restart logged")
    assert {status for status, _, _ in many(10, lambda _: get(url, {"Accept": MANIFEST_ACCEPT}))} == {200}


def test_sigterm_stops_every_worker_and_frees_the_data_directory(
    group: MirrorProcess, mirror_factory: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    workers = group.workers()
    assert group.stop() == 0
    assert not any(alive(pid) for pid in workers)
    log = group.log.read_text()
    assert "stopping 2 workers (SIGTERM)" in log and "Traceback" not in log
    group.start()  # the same data directory: the lock was released
    wait_for_workers(group, 2)


def test_workers_do_not_outlive_a_killed_supervisor(group: MirrorProcess) -> None:
    workers = group.workers()
    os.kill(group.pid, signal.SIGKILL)
    wait_until_sync(lambda: [pid for pid in workers if alive(pid)], check=lambda left: not left, timeout=20,
                    interval=0.1, what="workers still running")


def test_the_primary_serves_the_admin_socket_and_its_replacement_takes_it_over(
    group: MirrorProcess, upstream: UpstreamRegistry, repo: str
) -> None:
    push_image(upstream, repo, "v1", layers=1)
    assert get(f"{group.url}/v2/{repo}/manifests/v1", {"Accept": MANIFEST_ACCEPT})[0] == 200
    sock = group.data_dir / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    refused = many(24, lambda _: get(f"{group.url}/admin/stats"))  # from loopback, on both workers
    assert {status for status, _, _ in refused} == {403}
    assert all(str(sock) in json.loads(body)["errors"][0]["message"] for _, _, body in refused)
    wait_served_by_both(group, "/admin/stats")
    assert cache_stats(group)["objects"]["manifest"] == 1  # over the socket, with no token configured
    primary, _ = group.workers()
    os.kill(primary, signal.SIGKILL)  # its socket stays behind, stale
    done = wait_until_sync(lambda: cache_command(group, "stats", "--json"), check=lambda d: d.returncode == 0,
                           timeout=30, interval=0.2, what="the replacement primary taking over the stale socket")
    assert json.loads(done.stdout)["objects"]["manifest"] == 1
    assert primary not in group.workers() and "restarting it" in group.log.read_text()
    assert group.stop() == 0
    assert not sock.exists()


def cache_command(mirror: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", "cache", *args, "--config", str(mirror.config)],
                          capture_output=True, text=True, timeout=60, check=False)


def cache_stats(mirror: MirrorProcess) -> dict[str, Any]:
    done = cache_command(mirror, "stats", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
