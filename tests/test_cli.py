"""The command line: check-config, configuration errors at start, and a real `serve` that stops on SIGTERM."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mirror.app import make_app
from mirror.cli import main
from mirror.storage.lock import DataDirLock
from tests.conftest import Mirror, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.waiting import wait_until_sync

MANIFEST_ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # bounds on polling a subprocess, never waited out when things work
STOP_TIMEOUT = 15.0


def test_check_config_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:6000"\ndefault_upstream = "ghcr.io"\n'
                    '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\ntag_ttl = "5m"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert "listen 127.0.0.1:6000" in out
    assert "default upstream ghcr.io" in out
    assert "upstream ghcr.io: https://ghcr.io (tag TTL 300s; credentials go to token realms on ghcr.io)" in out
    assert "docker.io" not in out


def test_check_config_refuses_a_bad_file_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\ntag_ttl = "soon"\n')
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(path) in captured.err
    assert "upstreams.ghcr.io.tag_ttl" in captured.err
    assert "expected a duration" in captured.err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_serve_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten = \"127.0.0.1:5000\"\ncolour = \"blue\"\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(path), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=STOP_TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "server.colour" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_serve_with_a_bad_listen_flag_exits_2_naming_the_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--listen", "nowhere", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=STOP_TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--listen" in proc.stderr and "HOST:PORT" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> None:
    """Until `mirror serve` listens and says it is ready; fails at once if it exits."""
    def readyz() -> int | None:
        assert proc.poll() is None, (proc.communicate()[1] or b"mirror serve exited").decode()
        try:
            return _get(f"{base}/readyz")[0]
        except OSError:
            return None
    wait_until_sync(readyz, check=lambda status: status == 200, timeout=START_TIMEOUT, what="mirror serve ready")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base)
        status, body = _get(f"{base}/v2/")  # the version check challenges, as Docker Hub's does
        assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        assert _get(f"{base}/healthz")[0] == 200
        status, body = _get(f"{base}/v2/Bad/manifests/latest")
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
        assert (data_dir / "index.db").is_file() and (data_dir / "tmp").is_dir()

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=STOP_TIMEOUT)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _serve(tmp_path: Path, port: int, workers: int, timeout: float = STOP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`mirror serve` that is expected to stop by itself (a start-up failure)."""
    return subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "MIRROR_SERVER_WORKERS": str(workers)},
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_refused_not_shared(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a socket that would share
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve(tmp_path, taken.getsockname()[1], workers)
    assert proc.returncode == 1, proc.stderr
    assert "cannot start" in proc.stderr and "in use" in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_database_from_a_newer_mirror_is_refused(tmp_path: Path, workers: int) -> None:
    (tmp_path / "data").mkdir()
    db = sqlite3.connect(tmp_path / "data" / "index.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (99)")
    db.commit()
    db.close()
    proc = _serve(tmp_path, _free_port(), workers)
    assert proc.returncode == 2, proc.stderr
    assert "schema version 99" in proc.stderr


def test_a_second_mirror_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    port = _free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MIRROR_SERVER_WORKERS": "2"},
    )
    try:
        _wait_ready(first, f"http://127.0.0.1:{port}")
        proc = _serve(tmp_path, _free_port(), 2)
        assert proc.returncode == 2, proc.stderr
        assert "in use by a running mirror" in proc.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=STOP_TIMEOUT)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_data_directory_whose_admin_socket_path_is_taken_is_refused(tmp_path: Path, workers: int) -> None:
    (tmp_path / "data").mkdir()
    taken = tmp_path / "data" / "admin.sock"
    taken.write_text("not a socket\n")
    proc = _serve(tmp_path, _free_port(), workers)
    assert proc.returncode == 2, proc.stderr
    assert f"{taken} exists and is not a socket" in proc.stderr and "Traceback" not in proc.stderr
    assert taken.read_text() == "not a socket\n"


def test_check_config_tells_where_the_admin_api_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    assert main(["check-config", str(path)]) == 0
    assert f"admin API on the unix socket {tmp_path / 'data' / 'admin.sock'} (not over TCP" in capsys.readouterr().out
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nadmin_token = "t0ken"\n')
    assert main(["check-config", str(path)]) == 0
    assert "and over TCP with the bearer token server.admin_token" in capsys.readouterr().out


# `mirror cache …` against a mirror running in this process: the command runs in a thread
# (it blocks), while the test's event loop serves it.

def _cache(*args: str) -> Any:
    return asyncio.to_thread(main, ["cache", *args])


async def test_cache_commands_go_over_the_admin_socket_without_a_token(
    mirror: Mirror, fake_registry: FakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_registry.add_image("library/app", "v1", 1)
    assert (await mirror.client.get("/v2/library/app/manifests/v1", headers=MANIFEST_ACCEPT)).status == 200
    data = ["--data-dir", str(mirror.data_dir)]
    assert await _cache("pin", "library/app:v1", *data) == 0
    assert "pinned: docker.io/library/app:v1" in capsys.readouterr().out
    assert await _cache("stats", "--json", *data) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pins"] == ["docker.io/library/app:v1"] and stats["objects"]["manifest"] == 1
    assert await _cache("unpin", "library/never-pulled:1", *data) == 2
    assert "docker.io/library/never-pulled:1 is not pinned" in capsys.readouterr().err
    assert await _cache("purge", "library/app:v1", "--repo", "library/app", *data) == 2
    assert "exactly one" in capsys.readouterr().err
    # the same server refuses the same command over TCP: no token is configured
    url = str(mirror.client.make_url("/"))
    assert await _cache("stats", "--url", url, *data) == 2
    err = capsys.readouterr().err
    assert f"unix socket {mirror.data_dir / 'admin.sock'}" in err and "server.admin_token" in err


async def test_over_tcp_the_command_sends_the_admin_token(
    fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert fake_registry.url
    config = mirror_config(fake_registry.url, tmp_path / "data")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, admin_token="right"))
    client = await aiohttp_client(make_app(config))
    url = str(client.make_url("/"))
    token_file = tmp_path / "token"
    token_file.write_text("right\n")
    assert await _cache("gc", "--url", url, "--admin-token-file", str(token_file)) == 0
    assert "removed_temp_files: 0" in capsys.readouterr().out
    monkeypatch.setenv("MIRROR_SERVER_ADMIN_TOKEN", "right")  # server.admin_token, as configuration reads it
    assert await _cache("stats", "--json", "--url", url) == 0
    assert json.loads(capsys.readouterr().out)["size_bytes"] == 0
    token_file.write_text("wrong\n")
    assert await _cache("stats", "--url", url, "--admin-token-file", str(token_file)) == 2
    assert f"{url.rstrip('/')}: the admin token is missing or wrong" in capsys.readouterr().err
    assert await _cache("stats", "--admin-token-file", str(token_file), "--data-dir", str(tmp_path / "data")) == 2
    assert "--admin-token-file goes with --url" in capsys.readouterr().err


async def test_a_running_mirror_without_a_listening_socket_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "index.db").touch()
    lock = DataDirLock(data_dir)
    lock.acquire()  # as a running mirror does
    try:
        assert await _cache("stats", "--data-dir", str(data_dir)) == 2
        assert f"its admin socket {data_dir / 'admin.sock'} is missing" in capsys.readouterr().err
        with socket.socket(socket.AF_UNIX) as bound:  # there, but no one listens
            bound.bind(str(data_dir / "admin.sock"))
            assert await _cache("stats", "--data-dir", str(data_dir)) == 2
        assert "nothing answers on its admin socket" in capsys.readouterr().err
    finally:
        lock.release()


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                    reason="needs root, to run the command as another user (under CI it must run)")
async def test_another_user_is_refused_by_the_socket_s_permissions(
    fake_registry: FakeRegistry, aiohttp_client: Any
) -> None:
    assert fake_registry.url
    shared = Path(tempfile.mkdtemp(prefix="mirror-perm-"))  # outside pytest's owner-only directory
    try:
        shared.chmod(0o755)
        await aiohttp_client(make_app(mirror_config(fake_registry.url, shared / "data")))
        (shared / "data").chmod(0o755)

        async def as_nobody() -> tuple[int, str]:
            """`mirror cache stats` in a child process that has become user nobody."""
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: the code is loaded already, so nobody need not read it
                code = 1
                try:
                    os.close(read_end)
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    sys.stderr = sys.stdout = open(write_end, "w")
                    code = main(["cache", "stats", "--data-dir", str(shared / "data")])
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            os.close(write_end)
            with open(read_end) as child:
                err = await asyncio.to_thread(child.read)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            return os.waitstatus_to_exitcode(status), err

        status, err = await as_nobody()  # the lock file is the mirror user's
        assert status == 2 and f"permission denied on {shared / 'data' / 'lock'}" in err, err
        (shared / "data" / "lock").chmod(0o666)  # past the lock: the socket's mode decides
        status, err = await as_nobody()
        assert status == 2 and f"permission denied on the admin socket {shared / 'data' / 'admin.sock'}" in err, err
    finally:
        shutil.rmtree(shared)


def test_check_config_tells_where_shared_content_lives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "fleet"\nendpoint_url = "http://minio:9000"\n'
                    'prefix = "a/"\nredirect = true\nmax_size = "1TiB"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "content shared in s3://fleet/a/ at http://minio:9000 (clients redirected to it; evicted beyond 1TiB)" in out
