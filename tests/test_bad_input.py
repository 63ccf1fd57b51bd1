"""Invariant 7: bad input gets a 4xx with an OCI error body; no path outside the data directory is opened.

Requests are sent as raw HTTP so that `..`, `%2e%2e`, `%2f` and `%00` reach the server exactly as
written (an HTTP client library would normalise them away). Every file the process opens while a
test runs is recorded with an audit hook. The mirror here is served as in production (by
`MirrorRunner`), so requests aiohttp's own parser refuses are answered by the mirror's handler too.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.app import make_app
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"
FILE_EVENTS = ("open", "os.rename", "os.replace", "os.remove", "os.listdir", "os.scandir")

_recording: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _recording is not None and event in FILE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])  # type: ignore[arg-type]
        if not path.endswith((".py", ".pyc")):  # a traceback's source; a module imported lazily (codecs)
            _recording.append(path)


@pytest.fixture
async def mirror(fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client) -> Mirror:  # type: ignore[no-untyped-def]
    """As tests.conftest's `mirror`, served by the production runner."""
    clock = FakeClock()
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, tmp_path / "data"), clock=clock)
    client = await aiohttp_client(app)
    return Mirror(client, clock, app, tmp_path / "data")


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
    request = f"{method} {target} HTTP/1.1\r\nHost: mirror\r\n{headers}Connection: close\r\n\r\n".encode()
    status, _, body = await _send(mirror, request)
    return status, body


async def _send(mirror: Mirror, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Write `request` as it is on a new connection; the status, headers and body of the answer."""
    server = mirror.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


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


@pytest.mark.parametrize("target, status", [
    (f"/v2/Bad/blobs/{DIGEST}", 400), ("/v2/library/app/blobs/sha256:..%2f..%2fetc", 400),
    ("/v2/library/app/manifests/.x", 404),  # a tag no registry could hold is unknown, as for GET
])
async def test_head_with_bad_input_is_4xx(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str], target: str, status: int) -> None:
    got, body = await _raw(mirror, target, method="HEAD")
    assert got == status and body == b""
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
    huge_value = f"X-Big: {'a' * 70_000}\r\n"  # over FIELD_MAX (64 KiB)
    many = "".join(f"X-H{i}: v\r\n" for i in range(500))
    for headers in (huge_value, many, f"Range: bytes={'1' * 70_000}-\r\n", f"Accept: {'a/b,' * 20_000}\r\n"):
        got, body = await _raw(mirror, f"/v2/library/app/blobs/{DIGEST}", headers=headers)
        assert got == 400 and _oci_error(got, body)["code"] == "UNSUPPORTED"
    got, body = await _raw(mirror, "/v2/library/app/manifests/" + "t" * 20_000)  # request line too long
    assert got == 400
    assert _oci_error(got, body)["message"].startswith("malformed request: the request line or a header is longer")
    assert fake_registry.requests == []


def _garbage() -> list[tuple[str, bytes]]:
    """About 400 malformed or hostile requests, as (label, bytes on the wire)."""
    def req(target: str, method: str = "GET", headers: str = "") -> bytes:
        return f"{method} {target} HTTP/1.1\r\nHost: mirror\r\n{headers}Connection: close\r\n\r\n".encode("utf-8", "surrogateescape")

    found: list[tuple[str, bytes]] = []
    # request lines the HTTP parser refuses
    for line in [b"GET\r\n", b"GET /v2/\r\n", b"GET /v2/ HTTP/9.9\r\n", b"GET /v2/ HTTP/1.1 extra\r\n",
                 b"GET  /v2/ HTTP/1.1\r\n", b"GET /v2/  HTTP/1.1\r\n", b"GET\t/v2/\tHTTP/1.1\r\n", b" GET /v2/ HTTP/1.1\r\n",
                 b"GET /v2/\x00 HTTP/1.1\r\n", b"GET /v2/\x7f HTTP/1.1\r\n", b"GET /v2/\xff\xfe HTTP/1.1\r\n",
                 b"GET /v2/ HTTP/1.1\n", b"GET /v2/ HTTPS/1.1\r\n", b"GET /v2/ http/1.1\r\n", b"GET /v2/ HTTP/1\r\n",
                 b"GET /v2/ HTTP/1.1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
                 b"GET /v2/ HTTP/1.1\r\nHost mirror\r\n", b"GET /v2/ HTTP/1.1\r\n: empty-name\r\n",
                 b"GET /v2/ HTTP/1.1\r\nBad Header: x\r\n", b"GET /v2/ HTTP/1.1\r\nX-A:\x00\r\n",
                 b"GET /v2/ HTTP/1.1\r\n folded: x\r\n", b"GET /v2/ HTTP/1.1\r\nContent-Length: -1\r\n",
                 b"GET /v2/ HTTP/1.1\r\nContent-Length: 1, 2\r\n", b"GET /v2/ HTTP/1.1\r\nContent-Length: abc\r\n",
                 b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                 b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked, x\r\n",
                 b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]:
        found.append((f"line {line[:30]!r}", line + (b"" if line.endswith(b"\r\n\r\n") else b"\r\n")))
    for method in ["G@T", "GE T", "GET\x7f", "GET(", "<script>", "g\xe9t", "M" * 300, "GET:", "[GET]", "{}", "GET,HEAD"]:
        found.append((f"method {method[:20]!r}", f"{method} /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1")))
    # sizes over the limits: line 8190 bytes, a header field 64 KiB (FIELD_MAX), 128 headers
    found += [
        ("long request line", req("/v2/library/app/manifests/" + "t" * 9000)),
        ("long name", req("/v2/" + "a/" * 5000 + "manifests/x")),
        ("long header", req("/v2/", headers=f"X-Big: {'a' * 70000}\r\n")),
        ("long header name", req("/v2/", headers=f"{'X' * 70000}: a\r\n")),
        ("many headers", req("/v2/", headers="".join(f"X-H{i}: v\r\n" for i in range(300)))),
        ("long Authorization", req("/v2/", headers=f"Authorization: Bearer {'a' * 70000}\r\n")),
        ("long Range", req(f"/v2/library/app/blobs/{DIGEST}", headers=f"Range: bytes={'1' * 70000}-\r\n")),
        ("long Accept", req("/v2/library/app/manifests/x", headers=f"Accept: {'a/b,' * 20000}\r\n")),
        ("podman-sized Range", req(f"/v2/library/app/blobs/{DIGEST}",
                                   headers="Range: bytes=" + ",".join(f"{i * 9}-{i * 9 + 5}" for i in range(1000)) + "\r\n")),
    ]
    # methods that parse but are no read
    for method in ["PUT", "POST", "PATCH", "DELETE", "PROPFIND", "MKCOL", "OPTIONS", "TRACE", "CONNECT", "LOCK"]:
        for target in ["/v2/", "/v2/library/app/manifests/latest", f"/v2/library/app/blobs/{DIGEST}", "/v2/_catalog",
                       f"/v2/library/app/referrers/{DIGEST}", "/v2/library/app/tags/list"]:
            found.append((f"{method} {target}", req(target, method, "Content-Length: 0\r\n")))
    # hostile paths, names, tags, digests under each endpoint
    names = ["..", "../..", "%2e%2e", "%2E%2E/%2e%2e", "..%2f..%2fetc", "a%00b", "%00", "Library/App", "-app", "app-",
             "a//b", "./a", "a/./b", "%5c..%5cetc", "a%20b", "a b", "\u00e9t\u00e9", "a" * 300, "_catalog/x", "%252e%252e",
             "x%2f..", "a..b", "a___b", "localhost:99999/x", "[::1]/x", "evil.example.com/x", "127.0.0.1:1/x",
             "docker.io:444/x", "ghcr.io/x"]
    for name in names:
        found.append((f"manifest name {name[:20]}", req(f"/v2/{name}/manifests/latest")))
        found.append((f"blob name {name[:20]}", req(f"/v2/{name}/blobs/{DIGEST}")))
        found.append((f"tags name {name[:20]}", req(f"/v2/{name}/tags/list")))
        found.append((f"referrers name {name[:20]}", req(f"/v2/{name}/referrers/{DIGEST}")))
    for tag in [".INVALID_MANIFEST_NAME", ".", "..", "%2e%2e", "-x", "a/b", "a%2fb", "t" * 129, "la%00test", "%ff",
                "a:b", "a b", "a%20b", "\u00e9", "x;y", "x?y=", "x#y", "%"]:
        found.append((f"tag {tag[:20]}", req(f"/v2/library/app/manifests/{tag}")))
        found.append((f"tag HEAD {tag[:20]}", req(f"/v2/library/app/manifests/{tag}", "HEAD")))
    for digest in ["sha256:totallywrong", "sha256:abc", "sha512:" + "ab" * 64, "md5:" + "a" * 32, f"{DIGEST}a",
                   f"sha256:{HEX.upper()}", "sha256:..%2f..%2fetc%2fpasswd", "sha256:%2e%2e", "..", f"{DIGEST}%00",
                   "sha256:" + "a" * 5000, ":" + "a" * 64, "sha256:", "sha256", f"SHA256:{HEX}", f"sha256:{HEX[:-1]}g",
                   "sha256:../../../../etc/passwd", "sha256%3a" + HEX[:10]]:
        for endpoint in ("blobs", "manifests", "referrers"):
            found.append((f"{endpoint} digest {digest[:20]}", req(f"/v2/library/app/{endpoint}/{digest}")))
    # paths that are no endpoint
    for target in ["/v2/../../etc/passwd", "/../../etc/passwd", "/v2/library/app/blobs/../../../../etc/passwd",
                   "/v2/library/app/manifests/latest/", "/v2/library/app/blobs/uploads/", "/v2/library/app",
                   "/v2/library/app/", "/v2/_catalog/x", "/v2/library/app/tags", "/v2/library/app/tags/list/x",
                   "/etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/v2//", "/v3/", "/token/../etc",
                   "/v2/%00", "/v2/library/app/referrers/", "http://evil.example/v2/", "*"]:
        found.append((f"path {target[:30]}", req(target)))
    # bad ns
    for ns in ["evil.example.com", "127.0.0.1", "docker.io:444", "docker.io%2fx", "http://127.0.0.1:1", "..%2f..", "%00",
               "a" * 300, "", "docker.io:", "DOCKER.IO:80", "ghcr.io", "[::1]", "docker.io&ns=ghcr.io", "docker.io%00",
               "%ff", "docker io"]:
        found.append((f"ns {ns[:20]}", req(f"/v2/x/manifests/latest?ns={ns}")))
        found.append((f"ns blob {ns[:20]}", req(f"/v2/x/blobs/{DIGEST}?ns={ns}")))
    found.append(("prefix and ns disagree", req("/v2/docker.io/library/x/manifests/latest?ns=quay.io")))
    # bad paging and filters
    for query in ["n=abc", "n=-1", "n=1e9", "n=99999999", "n=%ff", "n=%00", "n= 1"]:
        found.append((f"tags {query[:20]}", req(f"/v2/library/app/tags/list?{query}")))
        found.append((f"catalog {query[:20]}", req(f"/v2/_catalog?{query}")))
    for query in ["last=" + "x" * 2000, "n=1&x=1" + "&y=1" * 10]:
        found.append((f"tags {query[:20]}", req(f"/v2/library/app/tags/list?{query}")))
    found.append(("artifactType too long", req(f"/v2/library/app/referrers/{DIGEST}?artifactType={'a' * 300}")))
    # ranges on a blob upstream does not have
    for rng in ["bytes=99999999999999999999-1", "bytes=" + "0-0," * 100 + "0-0", "bytes=20-10", "bytes=--1",
                "bytes=abc", "items=0-1", "bytes=-", "bytes=0-1;x", "bytes=\u00e9"]:
        found.append((f"range {rng[:20]}", req(f"/v2/library/app/blobs/{DIGEST}", headers=f"Range: {rng}\r\n")))
    # bad credentials
    for auth in ["Basic !!!", "Basic " + "a" * 100, "Bearer", "Bearer a b c", "Digest x", "Basic Og==", "\u00e9"]:
        found.append((f"auth {auth[:20]}", req("/v2/library/app/manifests/x", headers=f"Authorization: {auth}\r\n")))
    return found


GARBAGE = _garbage()


def test_the_garbage_is_about_four_hundred_requests() -> None:
    assert len(GARBAGE) >= 400


async def test_kind12_garbage_requests_get_4xx_oci_errors_and_touch_nothing(
        mirror: Mirror, fake_registry: FakeRegistry, opened: list[str]) -> None:
    """Every answer to ~400 malformed or hostile requests is a 4xx with an OCI JSON body: none is a
    5xx, none is aiohttp's plain text, and no file outside the data directory is touched."""
    wrong = []
    for label, request in GARBAGE:
        status, headers, body = await _send(mirror, request)
        head = request.startswith(b"HEAD ")
        try:
            assert 400 <= status < 500
            if not head:
                assert headers.get("content-type", "").startswith("application/json")
                _oci_error(status, body)
        except (AssertionError, ValueError, KeyError):
            wrong.append((label, status, body[:120]))
    assert wrong == []
    assert not any(".." in call.path or "\x00" in call.path or "etc" in call.path for call in fake_registry.requests)


async def test_a_podman_sized_range_header_is_read(mirror: Mirror, fake_registry: FakeRegistry) -> None:
    """podman 5 sends the chunks of a zstd:chunked layer in one Range header over 10 KiB: not a
    malformed request, but more ranges than are served one by one, so the whole blob."""
    data = os.urandom(20_000)
    digest = fake_registry.add_blob("library/app", data)
    header = "bytes=" + ",".join(f"{i * 19}-{i * 19 + 9}" for i in range(1000))
    assert len(header) > 10_000
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})
    assert resp.status == 200 and await resp.read() == data
