"""Invariant 7: bad input gets a 4xx with an OCI error body; no path outside the data directory is opened.

Requests are sent as raw HTTP so that `..`, `%2e%2e`, `%2f` and `%00` reach the server exactly as
written (an HTTP client library would normalise them away). Every file the process opens while a
test runs is recorded with an audit hook.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mirror
from tests.fakes.registry import FakeRegistry

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"
FILE_EVENTS = ("open", "os.rename", "os.replace", "os.remove", "os.listdir", "os.scandir")

_recording: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _recording is not None and event in FILE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])  # type: ignore[arg-type]
        if not path.endswith(".py"):  # source read to format a logged traceback
            _recording.append(path)


@pytest.fixture
def opened(mirror: Mirror) -> Iterator[list[str]]:
    """Paths the process opens (or lists, renames, removes) during the test, checked to be inside the data dir."""
    global _recording, _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # hooks cannot be removed: it records only while `_recording` is set
        _hooked = True
    _recording = paths = []
    try:
        yield paths
    finally:
        _recording = None
    root = mirror.data_dir.resolve()
    outside = [p for p in paths if not Path(p).resolve().is_relative_to(root)]
    assert not outside, f"opened outside the data directory: {outside}"


async def _raw(mirror: Mirror, target: str, method: str = "GET", headers: str = "") -> tuple[int, bytes]:
    """Send `target` byte for byte; return the status and the body."""
    server = mirror.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: mirror\r\n{headers}Connection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _oci_error(status: int, body: bytes) -> dict[str, str]:
    """Assert a 4xx whose body is an OCI error; return the first error."""
    assert 400 <= status < 500, (status, body[:300])
    errors = json.loads(body)["errors"]
    assert isinstance(errors, list) and errors
    code, message = errors[0]["code"], errors[0]["message"]
    assert isinstance(code, str) and code.isupper()
    assert isinstance(message, str) and message
    return errors[0]


BAD_REQUESTS = [  # (target, status, code)
    # names
    (f"/v2/Library/App/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/../../etc/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/library/../../../etc/passwd/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/..%2f..%2fetc/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/%2e%2e/%2e%2e/etc/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/%2E%2E/blobs/{DIGEST}", 400, "NAME_INVALID"),
    (f"/v2/a%00b/blobs/{DIGEST}", 400, "NAME_INVALID"),
    ("/v2/./library/app/manifests/latest", 400, "NAME_INVALID"),
    ("/v2//app/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/app//x/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/-app/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/%5C..%5Cetc/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/" + "a" * 300 + "/tags/list", 400, "NAME_INVALID"),
    ("/v2/" + "a/" * 2000 + "manifests/latest", 400, "NAME_INVALID"),
    ("/v2/..%2f..%2fetc/tags/list", 400, "NAME_INVALID"),
    # tags no registry could hold are unknown, as distribution answers (OCI conformance: 404)
    ("/v2/library/app/manifests/.hidden", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/..", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/%2e%2e", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/..%2f..%2fetc", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/la%00test", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/app/manifests/" + "t" * 5000, 404, "MANIFEST_UNKNOWN"),
    # digests
    ("/v2/library/app/blobs/sha512:" + "ab" * 64, 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    (f"/v2/library/app/blobs/{DIGEST}a", 400, "DIGEST_INVALID"),
    (f"/v2/library/app/blobs/sha256:{HEX.upper()}", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:..%2f..%2fetc%2fpasswd", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:%2e%2e", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/%2e%2e", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/..", 400, "DIGEST_INVALID"),
    (f"/v2/library/app/blobs/{DIGEST}%00", 400, "DIGEST_INVALID"),
    ("/v2/library/app/blobs/sha256:" + "a" * 5000, 400, "DIGEST_INVALID"),
    ("/v2/library/app/manifests/sha512:" + "ab" * 64, 400, "DIGEST_INVALID"),
    ("/v2/library/app/manifests/sha256:..%2f..%2fetc", 400, "DIGEST_INVALID"),
    (f"/v2/library/app/manifests/sha256:{HEX[:-1]}", 400, "DIGEST_INVALID"),
    # paths that are no endpoint
    ("/v2/library/app/blobs/../../../../etc/passwd", 404, "NAME_UNKNOWN"),
    (f"/v2/library/app/blobs/{DIGEST}/..", 404, "NAME_UNKNOWN"),
    ("/v2/library/app/manifests/latest/", 404, "NAME_UNKNOWN"),
    ("/etc/passwd", 404, "NAME_UNKNOWN"),
    # upstreams: never an open proxy
    ("/v2/evil.example.com/x/manifests/latest", 404, "NAME_UNKNOWN"),
    (f"/v2/localhost/x/blobs/{DIGEST}", 404, "NAME_UNKNOWN"),
    ("/v2/x/manifests/latest?ns=evil.example.com", 404, "NAME_UNKNOWN"),
    ("/v2/x/manifests/latest?ns=127.0.0.1", 404, "NAME_UNKNOWN"),
    ("/v2/x/manifests/latest?ns=docker.io:444", 404, "NAME_UNKNOWN"),
    ("/v2/evil.example.com/x/manifests/latest?ns=docker.io", 404, "NAME_UNKNOWN"),
    ("/v2/ghcr.io/x/manifests/latest?ns=docker.io", 404, "NAME_UNKNOWN"),  # ghcr.io is not configured here
    ("/v2/docker.io/x/manifests/latest?ns=docker.io:", 400, "NAME_INVALID"),
    ("/v2/x/manifests/latest?ns=docker.io%2fx", 400, "NAME_INVALID"),
    ("/v2/x/manifests/latest?ns=http://127.0.0.1:1", 400, "NAME_INVALID"),
    ("/v2/x/manifests/latest?ns=..%2f..", 400, "NAME_INVALID"),
    ("/v2/x/manifests/latest?ns=%00", 400, "NAME_INVALID"),
    (f"/v2/x/blobs/{DIGEST}?ns=" + "a" * 300, 400, "NAME_INVALID"),
]


@pytest.mark.parametrize(("target", "status", "code"), BAD_REQUESTS, ids=lambda v: str(v)[:60])
async def test_bad_input_gets_a_4xx_oci_error_and_touches_nothing(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str], target: str, status: int, code: str) -> None:
    got, body = await _raw(mirror, target)
    assert got == status, body[:300]
    assert _oci_error(got, body)["code"] == code
    assert fake_registry.requests == []
    assert opened == []


@pytest.mark.parametrize("target", [
    f"/v2/Bad/blobs/{DIGEST}", "/v2/library/app/blobs/sha256:..%2f..%2fetc", "/v2/library/app/manifests/.x",
])
async def test_head_with_bad_input_is_4xx(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str], target: str) -> None:
    got, body = await _raw(mirror, target, method="HEAD")
    assert got in (400, 404) and body == b""
    assert fake_registry.requests == []


PUSH_TARGETS = [
    "/v2/", "/v2/library/app/manifests/latest", f"/v2/library/app/manifests/{DIGEST}",
    f"/v2/library/app/blobs/{DIGEST}", "/v2/x/blobs/uploads/", "/v2/x/blobs/uploads/some-uuid",
    "/v2/library/app/tags/list", "/v2/_catalog", "/v2/Bad/manifests/latest",
]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "PROPFIND", "MKCOL", "OPTIONS", "TRACE"])
async def test_push_delete_and_other_methods_are_405_read_only(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str], method: str) -> None:
    for target in PUSH_TARGETS:
        got, body = await _raw(mirror, target, method=method, headers="Content-Length: 0\r\n")
        assert got == 405, (target, body[:300])
        err = _oci_error(got, body)
        assert err["code"] == "UNSUPPORTED", target
        assert "read-only mirror" in err["message"] and method in err["message"], target
    assert fake_registry.requests == []
    assert opened == []


@pytest.mark.parametrize(("method", "target"), [
    ("PROPFIND", "/healthz"), ("POST", "/readyz"), ("PUT", "/metrics"), ("DELETE", "/metrics"),
])
async def test_wrong_method_outside_v2_is_405_with_oci_body(
        mirror: Mirror, opened: list[str], method: str, target: str) -> None:
    got, body = await _raw(mirror, target, method=method, headers="Content-Length: 0\r\n")
    assert got == 405
    assert _oci_error(got, body)["code"] == "UNSUPPORTED"


ABSURD_RANGES = [
    "bytes=99999999999999999999-1",
    "bytes=0-0," * 500 + "0-0",
    "bytes=" + "9" * 4000 + "-",
    "bytes=5000-6000",
    "bytes=-0",  # a zero-length suffix is unsatisfiable (RFC 9110 14.1.2)
    "bytes=20-10",
    "bytes=--1",
    "bytes=1-2-3",
    "bytes=-",
    "bytes=",
    "bytes=-1-",
    "bytes=abc",
    "items=0-1",
]


@pytest.mark.parametrize("state", ["hit", "miss"])
async def test_absurd_ranges_get_416_with_an_oci_body(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str], state: str) -> None:
    failures = []
    for i, rng in enumerate(ABSURD_RANGES):
        digest = fake_registry.add_blob("library/app", os.urandom(1000 + i))
        url = f"/v2/library/app/blobs/{digest}"
        if state == "hit":
            assert (await mirror.client.get(url)).status == 200
        resp = await mirror.client.get(url, headers={"Range": rng})
        body = await resp.read()
        if resp.status != 416:
            failures.append((rng[:40], resp.status))
            continue
        assert _oci_error(resp.status, body)["code"] == "RANGE_INVALID"
    assert failures == []
    assert any("/content/sha256/" in p for p in opened)  # the recorder sees the files that are served


async def test_oversized_headers_are_4xx(mirror: Mirror, fake_registry: FakeRegistry, opened: list[str]) -> None:
    huge_value = f"X-Big: {'a' * 20_000}\r\n"
    many = "".join(f"X-H{i}: v\r\n" for i in range(500))
    for headers in (huge_value, many, f"Range: bytes={'1' * 20_000}-\r\n", f"Accept: {'a/b,' * 5000}\r\n"):
        got, body = await _raw(mirror, f"/v2/library/app/blobs/{DIGEST}", headers=headers)
        assert 400 <= got < 500, (got, body[:200])
    got, _ = await _raw(mirror, "/v2/library/app/manifests/" + "t" * 20_000)  # request line too long
    assert 400 <= got < 500
    assert fake_registry.requests == []
