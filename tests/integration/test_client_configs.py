"""The client configuration `mirror config` prints makes podman, containerd and dockerd pull through
the mirror (issue 5).

Each test writes the files with `python -m mirror config <client> --url http://HOST --write DIR`, as a
user would, and has the real client pull with exactly those files in place of the driver's own
(see `tests/integration/clients.py`). No client can reach a real registry, so a pull that succeeds
went through the mirror.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.clients import Containerd, Dockerd, Podman
from tests.integration.images import push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def mirror_config(client: str, mirror: MirrorProcess, dest: Path) -> Path:
    """Run `python -m mirror config CLIENT --url MIRROR --write DEST`; return DEST."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    argv = [sys.executable, "-m", "mirror", "config", client, "--url", mirror.url, "--write", str(dest)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{argv} exited with {done.returncode}:\n{done.stderr}"
    return dest


def test_podman_pulls_with_generated_registries_conf(
    podman_client: Podman, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, tmp_path: Path
) -> None:
    conf = mirror_config("podman", mirror_proc, tmp_path / "podman") / "registries.conf"
    image = push_image(upstream, repo, "v1", kind="index")
    assert podman_client.pull(mirror_proc.host, repo, "v1", registries_conf=conf) == image.digest
    podman_client.remove_all()
    assert podman_client.pull(mirror_proc.host, repo, image.digest, registries_conf=conf) == image.digest


def test_containerd_pulls_with_generated_hosts_dir(
    containerd_client: Containerd, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, tmp_path: Path
) -> None:
    certs_d = mirror_config("containerd", mirror_proc, tmp_path / "certs.d")
    assert (certs_d / "docker.io" / "hosts.toml").is_file()
    image = push_image(upstream, repo, "v1", kind="index")
    assert containerd_client.pull(mirror_proc.host, repo, "v1", hosts_dir=certs_d) == image.digest
    containerd_client.remove_all()
    assert containerd_client.pull(mirror_proc.host, repo, image.digest, hosts_dir=certs_d) == image.digest


def test_dockerd_pulls_with_generated_daemon_json(
    dockerd_client: Dockerd, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, tmp_path: Path
) -> None:
    generated = json.loads((mirror_config("docker", mirror_proc, tmp_path / "docker") / "daemon.json").read_text())
    assert generated["registry-mirrors"] == [mirror_proc.url]
    image = push_image(upstream, repo, "v1", kind="index")
    assert dockerd_client.pull(mirror_proc.host, repo, "v1", daemon_json=generated) == image.digest
    dockerd_client.remove_all()
    assert dockerd_client.pull(mirror_proc.host, repo, image.digest, daemon_json=generated) == image.digest
