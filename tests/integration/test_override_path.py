"""containerd pulls through a hosts.toml host with a path and `override_path = true` (kind 11).

containerd then sends `/v2/<the host's path>/<repo>/manifests/<ref>?ns=<registry>`:
with a host `http://mirror/v2/docker.io` that is `/v2/docker.io/library/x/...?ns=docker.io`,
and the mirror must route it by the prefix (agreeing with `ns`). The mirror here mirrors
docker.io and "ghcr.io" (both the real registry behind the fault proxy); clients reach no
real registry, so every pull below went through the mirror's prefix routing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.integration.clients import Containerd, PullError
from tests.integration.images import push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry, random_repo
from tests.waiting import wait_until_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _hosts_dir(root: Path, mirror: MirrorProcess, registry: str, server: str) -> Path:
    hosts = root / registry / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(
        f'server = "{server}"\n\n'
        f'[host."http://{mirror.host}/v2/{registry}"]\n'
        'capabilities = ["pull", "resolve"]\n'
        "override_path = true\n"
    )
    return root


def _requests(mirror: MirrorProcess, expected: str, timeout: float = 10.0) -> list[str]:
    """The request targets of the mirror's access log, once `expected` is among them (the log is
    written in batches); fails after `timeout` seconds."""
    return wait_until_sync(lambda: re.findall(r" (?:GET|HEAD) (\S+) ", mirror.log.read_text(errors="replace")),
                           check=lambda seen: expected in seen, timeout=timeout, what=f"{expected} in the access log")


@pytest.fixture
def two_registries(mirror_factory: Callable[..., MirrorProcess], fault_proxy: FaultProxy) -> MirrorProcess:
    return mirror_factory(extra=f'[upstreams."ghcr.io"]\nurl = "{fault_proxy.url}"\n')


def test_kind11_containerd_override_path_with_a_docker_io_prefix(
    containerd_client: Containerd, upstream: UpstreamRegistry, two_registries: MirrorProcess, repo: str, tmp_path: Path,
) -> None:
    image = push_image(upstream, repo, "v1", kind="index")
    hosts = _hosts_dir(tmp_path / "hosts", two_registries, "docker.io", "https://registry-1.docker.io")
    assert containerd_client.pull(two_registries.host, repo, "v1", hosts_dir=hosts) == image.digest
    expected = f"/v2/docker.io/{repo}/manifests/v1?ns=docker.io"
    seen = _requests(two_registries, expected)
    assert expected in seen, seen
    assert all(t.startswith(f"/v2/docker.io/{repo}/") for t in seen if "/v2/" in t), seen
    containerd_client.remove_all()
    gets = upstream.gets(repo)
    assert containerd_client.pull(two_registries.host, repo, image.digest, hosts_dir=hosts) == image.digest
    assert upstream.gets(repo) == gets, "the second pull is served from the cache"


def test_kind11_containerd_override_path_for_another_registry(
    containerd_client: Containerd, upstream: UpstreamRegistry, two_registries: MirrorProcess, tmp_path: Path,
) -> None:
    """ghcr.io/<org>/<app> through `http://mirror/v2/ghcr.io` (the upstream is the same real registry)."""
    repo = random_repo("org")
    image = push_image(upstream, repo, "v1", kind="oci")
    hosts = _hosts_dir(tmp_path / "hosts", two_registries, "ghcr.io", "https://ghcr.io")
    name = f"ghcr.io/{repo}:v1"
    containerd_client.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", containerd_client.snapshotter, name)
    rows = containerd_client.ctr("images", "ls", f"name=={name}").splitlines()[1:]
    assert rows and rows[0].split()[2] == image.digest
    expected = f"/v2/ghcr.io/{repo}/manifests/v1?ns=ghcr.io"
    assert expected in _requests(two_registries, expected)


def test_kind11_prefix_and_ns_that_disagree_are_refused(
    containerd_client: Containerd, upstream: UpstreamRegistry, two_registries: MirrorProcess, repo: str, tmp_path: Path,
) -> None:
    """A hosts.toml for docker.io whose host path names ghcr.io: the mirror refuses (400), never mixes them."""
    push_image(upstream, repo, "v1")
    hosts = tmp_path / "hosts" / "docker.io" / "hosts.toml"
    hosts.parent.mkdir(parents=True)
    hosts.write_text(f'[host."http://{two_registries.host}/v2/ghcr.io"]\ncapabilities = ["pull", "resolve"]\n'
                     "override_path = true\n")
    with pytest.raises(PullError):
        containerd_client.pull(two_registries.host, repo, "v1", hosts_dir=hosts.parent.parent)
    expected = f"/v2/ghcr.io/{repo}/manifests/v1?ns=docker.io"
    assert expected in _requests(two_registries, expected)
    assert " 400 " in next(line for line in two_registries.log.read_text().splitlines() if expected in line)
