"""The command line: check-config, configuration errors at start, and a real `serve` that stops on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mirror.cli import main
from tests.waiting import wait_until_sync

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
    assert "upstream ghcr.io: https://ghcr.io (tag TTL 300s)" in out
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
