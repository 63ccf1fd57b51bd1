"""A real upstream for integration tests: Debian's docker-registry (distribution 2.8) behind
the fake token server, with its access log parsed so tests can count upstream requests."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, NoReturn

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.token_server import TokenServer
from tests.integration.process import http_status, stop, wait_ready

# Which Debian package provides each binary the integration tests run.
DEBIAN_PACKAGES = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "podman": "podman",
    "containerd": "containerd",
    "ctr": "containerd",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "systemd-analyze": "systemd",
    "haproxy": "haproxy",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """Path of `name`; a missing binary skips the test locally but fails it in CI (CI=true),
    so CI can never go green by silently skipping the integration suite."""
    path = shutil.which(name)
    if path is not None:
        return path
    package = DEBIAN_PACKAGES.get(name)
    hint = f"install the Debian package {package!r}" if package else "install it"
    missing(f"{name} not found on PATH; {hint}")


def missing(message: str) -> NoReturn:
    """A binary or facility the test needs is absent: fail under CI=true, skip only outside CI."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(f"{message} (outside CI only; CI=true fails)")


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_repo(namespace: str = "library") -> str:
    """A fresh repository name, Docker Hub style: `library/<x>` is what `docker.io/<x>` means."""
    return f"{namespace}/t{secrets.token_hex(6)}"


class UpstreamRequest(NamedTuple):
    """One line of the registry's access log; `path` is the request target, query included."""

    method: str
    path: str
    status: int


# Apache combined format, as distribution writes it on stdout: ... "GET /v2/ HTTP/1.1" 401 87 ...
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')
_SYNC_PATH = "/v2/?harness-sync="


class UpstreamRegistry:
    """docker-registry on 127.0.0.1:`port` with `auth: token`, storage and logs under `workdir`.

    `stop()`/`start()` simulate an outage: the same port and storage come back.
    """

    def __init__(self, workdir: Path, token_server: TokenServer, binary: str = "docker-registry") -> None:
        self.workdir = workdir
        self.token_server = token_server
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "registry.log"
        self._binary = binary
        self._config = workdir / "config.yml"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def admin_credentials(self) -> tuple[str, str]:
        """Credentials with push+pull on every repository (for seeding images)."""
        admin = self.token_server.admin
        return admin, self.token_server.users[admin]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        cert = self.token_server.write_cert(self.workdir / "token-cert.pem")
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            # A fixed secret keeps upload URLs valid across stop()/start().
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            # quay.io and old Docker Hub images are signed schema1; distribution verifies and keeps them
            "compatibility": {"schema1": {"enabled": True}},
            "auth": {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(cert),
                }
            },
        }
        # YAML is a superset of JSON, so no YAML library is needed.
        self._config.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 15.0) -> None:
        """Start the registry and wait until /v2/ answers its 401 challenge."""
        if self.running:
            return
        with self.access_log.open("ab") as out, self.error_log.open("ab") as err:
            self._process = subprocess.Popen([self._binary, "serve", str(self._config)], stdout=out, stderr=err)
        wait_ready(self._process, lambda: http_status(f"{self.url}/v2/") == 401, "docker-registry", timeout, self._log_tail)

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers); storage and port are kept."""
        process, self._process = self._process, None
        stop(process)

    def requests(self) -> list[UpstreamRequest]:
        """Every request the registry has answered so far, oldest first.

        The log line is written just after the response is sent, so a request that has just
        completed may not be logged yet: a marker request is sent first and the log is read up
        to it, which makes counts exact for requests that finished before the call.
        """
        marker = f"{_SYNC_PATH}{secrets.token_hex(8)}" if self.running else None
        if marker is not None:
            http_status(self.url + marker)
        deadline = time.monotonic() + 5
        while True:
            entries = self._parse_log()
            if marker is None or any(e.path == marker for e in entries) or time.monotonic() > deadline:
                return [e for e in entries if not e.path.startswith(_SYNC_PATH)]
            time.sleep(0.01)

    def gets(self, repo: str) -> int:
        """Successful GETs of `repo`'s manifests and blobs: what a cache should have saved."""
        return self.count("GET", f"/v2/{repo}/", status=200)

    def count(self, method: str, path_substring: str, status: int | None = None) -> int:
        """How many `method` requests had `path_substring` in their target (and `status`, if given)."""
        return sum(
            1
            for r in self.requests()
            if r.method == method and path_substring in r.path and (status is None or r.status == status)
        )

    def _parse_log(self) -> list[UpstreamRequest]:
        if not self.access_log.exists():
            return []
        entries = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            if m := _ACCESS_LINE.search(line):
                entries.append(UpstreamRequest(m["method"], m["path"], int(m["status"])))
        return entries

    def _log_tail(self, lines: int = 20) -> str:
        if not self.error_log.exists():
            return ""
        return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def registry_behind(token_server: TokenServer, workdir: Path, realm_host: str = "127.0.0.1") -> Iterator[UpstreamRegistry]:
    """docker-registry behind `token_server`, which is started on `realm_host`; both stopped on exit."""
    binary = require_binary("docker-registry")
    token_server.start(host=realm_host)
    registry = UpstreamRegistry(workdir, token_server, binary)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        token_server.stop()


def break_upstream(fault: str, upstream: UpstreamRegistry, proxy: FaultProxy) -> None:
    """Make the upstream look `stopped`, answer `503`, or `hang` (through the fault proxy in front of it)."""
    if fault == "stopped":
        upstream.stop()
    elif fault == "503":
        proxy.status = 503
    else:
        proxy.hang = True
