"""A fleet of three mirrors behind haproxy, with deploy/fleet/haproxy.cfg as shipped, sharing
content through one bucket of a real S3-compatible server (JuiceFS's gateway, MinIO's code).

Only the `bind` address and the `server` addresses of the file are rewritten for the test;
everything else (hash key, consistent hashing, health checks, retries) is what deploys.
Which replica answered a request is read from the replicas' access logs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.replicas import HAPROXY_CFG, render_haproxy
from mirror.storage.secret import SECRET_FILE, data_dir_secret
from tests.fakes.fault_proxy import FaultProxy
from tests.integration.clients import Skopeo
from tests.integration.images import DOCKER_MANIFEST, OCI_MANIFEST, Blob, push_blob, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.process import http_status, stop, wait_ready
from tests.integration.registry import UpstreamRegistry, free_port, random_repo, require_binary
from tests.integration.s3 import S3Gateway
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.integration



class Fleet:
    """haproxy on 127.0.0.1:`port` in front of `mirrors`, named mirror1..3 in the config."""

    def __init__(self, workdir: Path, upstream_url: str, s3: S3Gateway) -> None:
        self.prefix = f"fleet-{secrets.token_hex(4)}/"
        self.mirrors = [MirrorProcess(workdir / f"mirror{i}", upstream_url, extra=s3.toml(self.prefix))
                        for i in (1, 2, 3)]
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = require_binary("haproxy")
        # One data-directory secret for every replica, as compose.yaml provides: a token one
        # replica issued is honoured by the others.
        first = self.mirrors[0].data_dir
        first.mkdir(parents=True)
        data_dir_secret(first)
        for mirror in self.mirrors[1:]:
            mirror.data_dir.mkdir(parents=True)
            shutil.copy(first / SECRET_FILE, mirror.data_dir / SECRET_FILE)
        for mirror in self.mirrors:
            mirror.start()
        servers = {f"mirror{i}": m.host for i, m in enumerate(self.mirrors, 1)}
        self.config.write_text(render_haproxy(HAPROXY_CFG.read_text(), f"127.0.0.1:{self.port}", servers))
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([binary, "-f", str(self.config), "-db"],
                                             stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self._process, lambda: http_status(f"{self.url}/readyz") == 200, "haproxy", 10, self.log_tail)

    def stop(self) -> None:
        process, self._process = self._process, None
        stop(process)
        for mirror in self.mirrors:
            mirror.stop()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def served(self, target: str, expected: int) -> dict[int, int]:
        """How many successful GETs of `target` (path and query) each replica (0, 1, 2) logged,
        once `expected` of them are logged in all (a line is written after its response)."""
        line = re.compile(rf" GET {re.escape(target)} 200 ")

        def counts() -> dict[int, int]:
            found = {i: len(line.findall(m.log.read_text(errors="replace"))) for i, m in enumerate(self.mirrors)}
            return {i: n for i, n in found.items() if n}

        return wait_until_sync(counts, check=lambda c: sum(c.values()) >= expected, timeout=10,
                               what=f"{expected} GETs of {target} in the replicas' logs")

    def owner(self, target: str) -> int:
        """The one replica that has answered GETs of `target`."""
        counts = self.served(target, 1)
        assert len(counts) == 1, f"{target} was answered by several replicas: {counts}"
        return next(iter(counts))


@pytest.fixture
def fleet(tmp_path: Path, fault_proxy: FaultProxy, s3: S3Gateway) -> Iterator[Fleet]:
    assert fault_proxy.url
    fleet = Fleet(tmp_path, fault_proxy.url, s3)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def get_sha256(url: str, headers: dict[str, str] | None = None) -> str:
    """The digest of the body of a GET of `url`; raises http.client.IncompleteRead for a body cut
    short (http.client's `read(n)` returns what came instead of raising)."""
    h = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as resp:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            received += len(chunk)
        expected = resp.headers.get("Content-Length")
    if expected is not None and received != int(expected):
        raise http.client.IncompleteRead(b"", int(expected) - received)
    return f"sha256:{h.hexdigest()}"


def random_blob(upstream: UpstreamRegistry, repos: list[str], path: Path, size: int) -> Blob:
    path.write_bytes(os.urandom(size))
    return push_blob(upstream, repos, path)


def blob_gets(upstream: UpstreamRegistry, digest: str) -> int:
    """Successful upstream GETs of the blob, under any repository name."""
    return upstream.count("GET", f"/blobs/{digest}", status=200)


def test_concurrent_cold_gets_through_haproxy_make_one_upstream_get_for_the_whole_fleet(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, fleet: Fleet, repo: str, tmp_path: Path
) -> None:
    blob = random_blob(upstream, [repo], tmp_path / "big", 64 * 1024 * 1024 + 17)
    target = f"/v2/{repo}/blobs/{blob.digest}"
    fault_proxy.delay = 0.0025  # ~2.5 s of streaming: the clients arrive while the owner fetches
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        digests = list(pool.map(get_sha256, [fleet.url + target] * 30))
    assert digests == [blob.digest] * 30
    assert blob_gets(upstream, blob.digest) == 1
    counts = fleet.served(target, 30)
    assert list(counts.values()) == [30], f"one replica answers every GET of a digest: {counts}"

    # The owner shared it: every replica, asked directly, serves it with no upstream GET.
    fleet.mirrors[next(iter(counts))].wait_idle()
    for mirror in fleet.mirrors:
        assert get_sha256(mirror.url + target) == blob.digest
    assert blob_gets(upstream, blob.digest) == 1


def test_a_digest_has_one_owner_whatever_repository_names_it(
    upstream: UpstreamRegistry, fleet: Fleet, repo: str, tmp_path: Path
) -> None:
    other = random_repo()
    blob = random_blob(upstream, [repo, other], tmp_path / "blob", 256 * 1024)
    targets = [f"/v2/{repo}/blobs/{blob.digest}", f"/v2/docker.io/{other}/blobs/{blob.digest}",
               f"/v2/{other}/blobs/{blob.digest}?ns=docker.io"]
    for target in targets:
        assert get_sha256(fleet.url + target) == blob.digest
    owners = {fleet.owner(target) for target in targets}
    assert len(owners) == 1, f"one digest, one replica: {owners}"
    assert blob_gets(upstream, blob.digest) == 1, "a second repository name costs no second upstream GET"

    # Asked directly, a replica that does not own the digest answers too, from the bucket.
    (owner,) = owners
    fleet.mirrors[owner].wait_idle()
    bystander = fleet.mirrors[(owner + 1) % 3]
    assert get_sha256(bystander.url + targets[0]) == blob.digest
    assert blob_gets(upstream, blob.digest) == 1


def test_a_manifest_by_tag_is_answered_by_one_replica_within_its_ttl(
    upstream: UpstreamRegistry, fleet: Fleet, repo: str
) -> None:
    image = push_image(upstream, repo, "v1", layers=1)
    target = f"/v2/{repo}/manifests/v1"
    accept = {"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"}

    def manifest_requests() -> list[str]:
        return [f"{r.method} {r.path}" for r in upstream.requests() if r.path.startswith(f"/v2/{repo}/manifests/")]

    seen: list[list[str]] = []
    for _ in range(2):
        with urllib.request.urlopen(urllib.request.Request(fleet.url + target, headers=accept), timeout=30) as resp:
            assert resp.read() == image.manifest
            assert resp.headers["Docker-Content-Digest"] == image.digest
        seen.append(manifest_requests())
    counts = fleet.served(target, 2)
    assert list(counts.values()) == [2], f"the same replica answers a tag twice: {counts}"
    assert sum(r.startswith("GET ") for r in seen[0]) == 1, seen[0]
    assert seen[1] == seen[0], "within the tag's TTL the second answer costs no upstream request"


def test_a_token_from_one_replica_is_honoured_by_the_others(
    upstream: UpstreamRegistry, fleet: Fleet, repo: str, tmp_path: Path
) -> None:
    blobs = [random_blob(upstream, [repo], tmp_path / f"blob{i}", 4096 + i) for i in range(9)]
    with urllib.request.urlopen(f"{fleet.url}/token?service=mirror&scope=repository:{repo}:pull", timeout=10) as resp:
        token = json.loads(resp.read())["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    for blob in blobs:
        assert get_sha256(f"{fleet.url}/v2/{repo}/blobs/{blob.digest}", bearer) == blob.digest
    owners = {fleet.owner(f"/v2/{repo}/blobs/{blob.digest}") for blob in blobs}
    assert len(owners) > 1, "nine digests spread over the replicas"


def test_a_killed_replicas_digests_are_served_by_the_others(
    upstream: UpstreamRegistry, fleet: Fleet, repo: str, tmp_path: Path
) -> None:
    blobs = [random_blob(upstream, [repo], tmp_path / f"blob{i}", 64 * 1024 + i) for i in range(9)]
    targets = {b.digest: f"/v2/{repo}/blobs/{b.digest}" for b in blobs}
    for digest, target in targets.items():
        assert get_sha256(fleet.url + target) == digest
    owners = {digest: fleet.owner(target) for digest, target in targets.items()}
    for mirror in fleet.mirrors:
        mirror.wait_idle()  # shared with the fleet
    victim = max(range(3), key=list(owners.values()).count)
    orphans = [digest for digest, owner in owners.items() if owner == victim]
    dead = fleet.mirrors[victim]
    os.killpg(dead.pid, signal.SIGKILL)  # every process of it at once; reaped below, after the requests
    wait_until_sync(lambda: http_status(f"{dead.url}/healthz") is None, timeout=5,
                    what="the killed replica's port closed")

    # At once, before haproxy's checks (every 2 s, two failures) can have noticed: the refused
    # connection is retried on the next replica of the ring (without redispatch: a 503).
    for digest in orphans:
        assert get_sha256(fleet.url + targets[digest]) == digest
        counts = fleet.served(targets[digest], 2)
        assert victim in counts and len(counts) == 2, f"{digest}: answered by {counts}, the dead replica {victim}"
    dead.kill()

    # Once haproxy's checks took it out of the ring, each digest has a new owner: the replica the
    # retry went to, or (as the ring picks the nearest point either side while a retry walks one
    # way) another one. Either serves what the dead replica shared, with no upstream GET.
    down = re.compile(rf"Server replicas/mirror{victim + 1} is DOWN")
    wait_until_sync(lambda: down.search(fleet.log.read_text(errors="replace")), timeout=15,
                    what=f"haproxy marking mirror{victim + 1} down")
    for digest in orphans:
        assert get_sha256(fleet.url + targets[digest]) == digest
    assert {digest: blob_gets(upstream, digest) for digest in orphans} == {digest: 1 for digest in orphans}


def get_with_retries(url: str, attempts: int = 3) -> str:
    """`get_sha256`, tried again whole after a broken transfer, as docker, containerd and podman do."""
    for attempt in range(1, attempts + 1):
        try:
            return get_sha256(url)
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def bucket_contents(s3: S3Gateway, prefix: str) -> tuple[dict[str, str], list[object]]:
    """{key: sha256 of its bytes} of the objects under `prefix`, and the multipart uploads left there."""
    async def read() -> tuple[dict[str, str], list[object]]:
        async with s3.client() as client:
            listed = await client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
            found = {}
            for entry in listed.get("Contents", []):
                got = await client.get_object(Bucket=s3.bucket, Key=entry["Key"])
                async with got["Body"] as body:
                    found[entry["Key"]] = hashlib.sha256(await body.read()).hexdigest()
            uploads = await client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)
            return found, uploads.get("Uploads", [])
    return asyncio.run(read())


def test_a_replica_killed_mid_transfer_costs_its_clients_a_retry_and_leaves_nothing_partial(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, fleet: Fleet, repo: str, tmp_path: Path, s3: S3Gateway
) -> None:
    size = 64 * 1024 * 1024 + 5
    blob = random_blob(upstream, [repo], tmp_path / "big", size)
    target = f"/v2/{repo}/blobs/{blob.digest}"
    fault_proxy.delay = 0.005  # ~5 s of streaming from upstream
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        clients = [pool.submit(get_with_retries, fleet.url + target) for _ in range(5)]

        def fetching() -> list[int]:
            return [i for i, m in enumerate(fleet.mirrors) if m.metric("mirror_inflight_fetches") == 1]
        (owner,) = wait_until_sync(fetching, check=bool, timeout=30, what="a replica fetching the blob")
        time.sleep(1.0)  # a fifth of the way in
        os.killpg(fleet.mirrors[owner].pid, signal.SIGKILL)
        assert [c.result(timeout=120) for c in clients] == [blob.digest] * 5
    fleet.mirrors[owner].kill()  # reaped
    survivors = [m for i, m in enumerate(fleet.mirrors) if i != owner]
    for mirror in survivors:
        mirror.wait_idle()
    # what the dead replica had not finished was fetched once more, once, by the replica the retries reached
    assert sum(m.metric("mirror_upstream_bytes_total", upstream="docker.io") for m in survivors) == size

    objects, uploads = bucket_contents(s3, fleet.prefix)
    content = {key.rsplit("/", 1)[1]: digest for key, digest in objects.items() if "/content/" in key}
    assert content == {blob.digest[7:]: blob.digest[7:]}, "the blob once, whole; nothing partial"
    assert uploads == []  # an upload begins only once a blob is verified and stored
    for mirror in survivors:
        gc = subprocess.run([sys.executable, "-m", "mirror", "cache", "gc", "--config", str(mirror.config)],
                            capture_output=True, text=True, timeout=60)
        assert gc.returncode == 0, gc.stderr
        for repaired in ("dropped_rows", "adopted_files", "removed_temp_files", "aborted_uploads"):
            assert f"{repaired}: 0" in gc.stdout, gc.stdout


def test_redirect_sends_every_worker_s_clients_to_the_bucket(
    upstream: UpstreamRegistry, tmp_path: Path, fault_proxy: FaultProxy, s3: S3Gateway, repo: str
) -> None:
    """With `redirect = true` and two workers, hits are redirected whichever worker answers."""
    blob = random_blob(upstream, [repo], tmp_path / "blob", 3 * 1024 * 1024 + 1)
    assert fault_proxy.url
    mirror = MirrorProcess(tmp_path / "mirror", fault_proxy.url, workers=2,
                           extra=s3.toml(f"redirect-{secrets.token_hex(4)}/") + "redirect = true\n")
    mirror.start()
    try:
        target = f"{mirror.url}/v2/{repo}/blobs/{blob.digest}"
        assert get_sha256(target) == blob.digest  # a miss: streamed while it arrives
        mirror.wait_idle()
        opener = urllib.request.build_opener(NoRedirect)
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with pytest.raises(urllib.error.HTTPError) as answer:
                opener.open(target, timeout=10)
            assert answer.value.code == 307, answer.value.read()
            location = answer.value.headers["Location"]
            assert location.startswith(s3.endpoint_url) and "X-Amz-Signature=" in location
        assert get_sha256(location) == blob.digest
        assert blob_gets(upstream, blob.digest) == 1
        redirected = re.compile(r"GET /v2/\S+/blobs/\S+ 307 \d+ \S+ hit worker (\d+)")
        wait_until_sync(lambda: set(redirected.findall(mirror.log.read_text())), check=lambda w: w == {"0", "1"},
                        timeout=10, what="307s from both workers in the access log")
    finally:
        mirror.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_skopeo_pulls_an_image_through_the_fleet_and_each_replica_serves_it_after_one_upstream_get(
    upstream: UpstreamRegistry, fleet: Fleet, repo: str, skopeo_client: Skopeo, s3: S3Gateway
) -> None:
    image = push_image(upstream, repo, "v1", layers=3)
    assert skopeo_client.pull(fleet.host, repo, "v1") == image.digest
    for mirror in fleet.mirrors:
        mirror.wait_idle()  # everything fetched is uploaded
    # each replica, asked directly, serves the whole image from its copy or the bucket
    for mirror in fleet.mirrors:
        assert skopeo_client.pull(mirror.host, repo, image.digest) == image.digest
    for blob in image.blobs:
        assert blob_gets(upstream, blob.digest) == 1, blob.digest
    stats = subprocess.run([sys.executable, "-m", "mirror", "cache", "stats", "--config", str(fleet.mirrors[0].config)],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    shared = re.search(rf"bucket   s3://{s3.bucket}/{fleet.prefix} at \S+: (\d+) objects", stats.stdout)
    assert shared and int(shared[1]) == len(image.blobs) + 1, stats.stdout  # the manifest and its blobs
