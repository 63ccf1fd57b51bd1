"""The mirror as users run it: `python -m mirror serve` in a subprocess with a TOML config."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.process import http_status, stop, wait_ready

from tests.integration.registry import free_port
from tests.waiting import wait_until_sync


class MirrorProcess:
    """A mirror on 127.0.0.1:`port` whose docker.io upstream is `upstream_url`."""

    def __init__(
        self, workdir: Path, upstream_url: str, tag_ttl: str = "10m", read_timeout: str = "5s",
        extra: str = "", workers: int | str | None = None,
    ) -> None:
        """`extra` is appended to the TOML file (more upstreams, settings of docker.io);
        `workers` sets server.workers (None: the mirror's default)."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log = workdir / "mirror.log"
        self.config = workdir / "mirror.toml"
        self.config.write_text(
            "[server]\n"
            f'listen = "{self.host}"\n'
            f'data_dir = "{self.data_dir}"\n'
            'shutdown_timeout = "5s"\n'
            + (f'workers = "{workers}"\n' if workers is not None else "")
            + '[upstreams."docker.io"]\n'
            f'url = "{upstream_url}"\n'
            f'tag_ttl = "{tag_ttl}"\n'
            'connect_timeout = "2s"\n'
            f'read_timeout = "{read_timeout}"\n'
            + extra
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own process group: the supervisor and its workers
            )
        wait_ready(self._process, lambda: http_status(f"{self.url}/readyz") == 200, "mirror", timeout, self.log_tail)

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def workers(self) -> list[int]:
        """Pids of the worker processes (none when the mirror runs as a single process)."""
        try:
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the mirror (its supervisor, if it has workers) and wait until every process of it is gone."""
        process, self._process = self._process, None
        status = stop(process, sig)
        if process is not None:
            _wait_group_gone(process.pid)
        return status

    def kill(self) -> None:
        """kill -9 of every process of the mirror at once: no chance to clean up, as in a crash."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no fetch or upload to a fleet's bucket is running: clients get their bytes
        before the mirror has stored and shared them."""
        wait_until_sync(lambda: self.metric("mirror_inflight_fetches") + self.metric("mirror_bucket_uploads"),
                        check=lambda n: n == 0, timeout=timeout,
                        what="no fetch running")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


def _wait_group_gone(pgid: int, timeout: float = 20.0) -> None:
    """Wait for the processes of group `pgid` to exit; kill -9 those left after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def mirrors(workdir: Path, upstream_url: str) -> Iterator[Callable[..., MirrorProcess]]:
    """`start(**settings)` runs a mirror (settings as MirrorProcess takes them) whose docker.io
    upstream is `upstream_url`, each in its own directory under `workdir`; all stopped on exit."""
    started: list[MirrorProcess] = []

    def start(**settings: Any) -> MirrorProcess:
        proc = MirrorProcess(workdir / f"mirror{len(started)}", upstream_url, **settings)
        started.append(proc)
        proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
