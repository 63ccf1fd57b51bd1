"""HTTPS with server.tls_cert/tls_key, JSON logs with server.log_format, and their validation at load."""
from __future__ import annotations

import io
import json
import logging
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mirror import config as configuration
from mirror.observe import AccessLogger, BatchingHandler, JsonFormatter, PlainFormatter
from mirror.requestinfo import SENT_BY_SENDFILE
from tests.fakes.certs import self_signed
from tests.integration.registry import free_port
from tests.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # bounds on polling a subprocess, never waited out when things work


class Served:
    """`python -m mirror serve` with a config file; stderr captured to a file."""

    def __init__(self, tmp_path: Path, server_settings: str) -> None:
        self.port = free_port()
        self.config = tmp_path / "mirror.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\ndata_dir = "{tmp_path / "data"}"\n'
            f'shutdown_timeout = "2s"\n{server_settings}'
            '[upstreams."docker.io"]\nurl = "http://127.0.0.1:9"\nconnect_timeout = "1s"\n'
        )
        self.log = tmp_path / "stderr.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(self.config)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, url: str, context: ssl.SSLContext | None = None) -> None:
        def readyz() -> int | None:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2, context=context) as resp:
                    return int(resp.status)
            except (urllib.error.URLError, ConnectionError):
                return None
        try:
            wait_until_sync(readyz, check=lambda status: status == 200, timeout=START_TIMEOUT, what="mirror ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, dict(exc.headers)


def test_serves_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    served = Served(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{served.port}"
        served.wait_ready(url, trusted)
        status, headers = get(f"{url}/v2/", trusted)
        assert status == 401  # the mirror's own auth challenge: no credentials were sent
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{url}/healthz", timeout=5, context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not spoken there
            urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=5)
    finally:
        log = served.stop()
    assert f"listening on https://127.0.0.1:{served.port}" in log


def test_json_logs_one_object_per_line_access_log_included(tmp_path: Path) -> None:
    served = Served(tmp_path, 'log_format = "json"\n')
    url = f"http://127.0.0.1:{served.port}"
    try:
        served.wait_ready(url)
        get(f"{url}/v2/")
        get(f"{url}/v2/library/app/manifests/v1")  # upstream unreachable: 503
    finally:
        log = served.stop()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["message"] == f"listening on http://127.0.0.1:{served.port}" for e in entries)
    access = [e for e in entries if e["logger"] == "mirror.access"]
    by_path = {e["path"]: e for e in access}
    assert by_path["/v2/"]["method"] == "GET" and by_path["/v2/"]["status"] == 401
    failed = by_path["/v2/library/app/manifests/v1"]
    assert failed["status"] == 503 and failed["result"] == "error"
    assert failed["remote"] == "127.0.0.1" and isinstance(failed["bytes"], int) and failed["duration"] >= 0
    assert "/v2/library/app/manifests/v1 503" in failed["message"]
    assert by_path["/readyz"]["result"] == "-"  # cache results are for /v2/ requests only


def test_plain_logs_are_not_json(tmp_path: Path) -> None:
    served = Served(tmp_path, "")
    url = f"http://127.0.0.1:{served.port}"
    try:
        served.wait_ready(url)
        get(f"{url}/v2/")
    finally:
        log = served.stop()
    access = [line for line in log.splitlines() if "mirror.access" in line and " GET /v2/ " in line]
    assert access
    assert not access[0].lstrip().startswith("{")


def test_json_formatter_keeps_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("mirror", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed x" and entry["level"] == "error"
    assert "ValueError: boom" in entry["exception"]


# -- validation at load ---------------------------------------------------------


def load_server(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> configuration.ServerConfig:
    path = tmp_path / "m.toml"
    path.write_text(f"[server]\n{body}")
    return configuration.load(str(path), env=env or {}).server


def test_log_lines_are_batched_but_warnings_are_written_at_once() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, delay=3600)  # no timed flush during the test
    handler.setFormatter(PlainFormatter())
    log = logging.getLogger("test.batching")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.info("first %s", "line")
        assert stream.getvalue() == ""  # waiting for more lines
        log.warning("something is off")
        lines = stream.getvalue().splitlines()
        assert [line.split(" ", 2)[2] for line in lines] == [
            "INFO test.batching: first line", "WARNING test.batching: something is off"]
        log.info("last")
    finally:
        log.removeHandler(handler)
        handler.close()  # as at exit: nothing is lost
    assert stream.getvalue().endswith("INFO test.batching: last\n")


@pytest.mark.parametrize("formatter", [PlainFormatter(), JsonFormatter()], ids=["plain", "json"])
def test_access_lines_written_directly_match_what_logging_would_write(formatter: logging.Formatter) -> None:
    fields = {"remote": "10.0.0.1", "method": "GET", "path": "/v2/", "status": 401, "bytes": 12,
              "duration": 0.001, "result": "denied"}
    record = logging.makeLogRecord({"name": "mirror.access", "levelno": logging.INFO, "levelname": "INFO",
                                    "msg": "%s", "args": ("10.0.0.1 GET /v2/ 401 12 0.001s denied",),
                                    "access": fields})
    record.created = 1_800_000_000.123456
    record.msecs = int((record.created - int(record.created)) * 1000) + 0.0
    assert formatter.access_line(record.created, record.getMessage(), lambda: fields) == formatter.format(record)  # type: ignore[attr-defined]


def test_batched_lines_are_written_within_the_delay() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, delay=0.05)
    try:
        handler.handle(logging.makeLogRecord({"msg": "soon", "levelno": logging.INFO}))
        assert wait_until_sync(stream.getvalue, timeout=5, interval=0.01, what="the batched line") == "soon\n"
    finally:
        handler.close()


def test_tls_settings_load(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = load_server(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert (server.tls_cert, server.tls_key) == (str(cert), str(key))
    assert configuration.ssl_context(server) is not None
    assert configuration.ssl_context(load_server(tmp_path, "")) is None


def test_tls_from_the_environment(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = load_server(tmp_path, "", {"MIRROR_SERVER_TLS_CERT": str(cert), "MIRROR_SERVER_TLS_KEY": str(key)})
    assert server.tls_cert == str(cert)


@pytest.mark.parametrize("case", ["missing cert", "cert without key", "key without cert", "mismatched pair", "not a cert"])
def test_bad_tls_settings_are_refused_at_load(tmp_path: Path, case: str) -> None:
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    body, key_name, reason = {
        "missing cert": (f'tls_cert = "{tmp_path}/absent.crt"\ntls_key = "{key}"\n', "server.tls_cert", "no such file"),
        "cert without key": (f'tls_cert = "{cert}"\n', "server.tls_key", "set together"),
        "key without cert": (f'tls_key = "{key}"\n', "server.tls_cert", "set together"),
        "mismatched pair": (f'tls_cert = "{cert}"\ntls_key = "{other_key}"\n', "server.tls_cert", "cannot load"),
        "not a cert": (f'tls_cert = "{junk}"\ntls_key = "{key}"\n', "server.tls_cert", "cannot load"),
    }[case]
    with pytest.raises(configuration.ConfigError) as err:
        load_server(tmp_path, body)
    assert err.value.key == key_name and reason in err.value.reason
    assert str(tmp_path / "m.toml") in str(err.value)


def test_log_format_and_public_url_are_validated(tmp_path: Path) -> None:
    assert load_server(tmp_path, 'log_format = "json"\n').log_format == "json"
    assert load_server(tmp_path, "").log_format == "plain"
    with pytest.raises(configuration.ConfigError, match="server.log_format: expected one of plain, json"):
        load_server(tmp_path, 'log_format = "xml"\n')
    assert load_server(tmp_path, "", {"MIRROR_SERVER_LOG_FORMAT": "json"}).log_format == "json"
    assert load_server(tmp_path, 'public_url = "https://mirror.example:5000/"\n').public_url == "https://mirror.example:5000"
    with pytest.raises(configuration.ConfigError, match="server.public_url"):
        load_server(tmp_path, 'public_url = "mirror.example:5000"\n')


def test_access_line_bytes_include_what_sendfile_sent() -> None:
    """Blob bodies go out with sendfile, past the response's writer; the access line counts them."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.access.sendfile")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    request = make_mocked_request("GET", "/v2/library/app/blobs/sha256:" + "a" * 64)
    request[SENT_BY_SENDFILE] = 4_456_864
    AccessLogger(logger, "").log(request, web.StreamResponse(), 0.01)
    assert records[0].access["bytes"] == 4_456_864  # type: ignore[attr-defined]
