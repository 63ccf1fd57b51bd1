"""Cached manifest hits answered where the connection reads them, before aiohttp parses them.

A CI farm resolving the same tags at once asks for one manifest thousands of times a second.
Every answer the full path (`routes.manifest`) gives as a hit is kept here as the bytes of its
HTTP response, keyed by everything in the request that can change it: the request target, the
`Authorization` header and the `Accept` headers. Beside it the service's `again(now)`, true while
the same request would get the same hit without asking upstream or the database (the tag's TTL,
the access decision, the manifest in memory: see `ManifestService`), which also does what a hit
does besides answering (access times, hit counts). The connection (`server.OciRequestHandler`)
answers a request from here when it is idle, the request is whole in what it read, and nothing
in it is outside what the key and `IGNORED` cover; anything else, and any hit that no longer
stands, goes to aiohttp as before. Metrics and the access log count both paths alike.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from mirror.metrics import Metrics

# A request line and header lines as RFC 9110/9112 define them, printable ASCII only, ending
# in the empty line: anything else (obs-fold, bare CR or LF, 8-bit bytes) goes to aiohttp,
# which answers it as it always did.
_REQUEST = re.compile(
    rb"(GET|HEAD) (/v2/[!-~]+/manifests/[!-~]+) HTTP/1\.1\r\n((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*)\r\n"
)
# Headers that change nothing in a manifest hit (the key holds Authorization and Accept).
IGNORED = frozenset((
    b"host", b"user-agent", b"accept-encoding", b"accept-language", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip", b"x-request-id",
    b"traceparent", b"tracestate",
))
MEMORY_BYTES = 16 << 20
KNOWN_FIELDS = 4096  # header blocks whose `Varies` are remembered (clients repeat theirs)
WRITE_BUFFER_LIMIT = 1 << 20  # answers waiting to be sent, past which aiohttp's flow control takes over

Varies = tuple[bytes, tuple[bytes, ...]]  # what of a request's headers its answer depends on: Authorization, Accept
Key = tuple[bytes, Varies]  # the request target, and that


@dataclass(frozen=True, slots=True)
class HotAnswer:
    head: bytes  # status line and headers, up to the Date header
    body: bytes
    authorization: str | None
    again: Callable[[float], bool]


@dataclass(frozen=True, slots=True)
class Answered:
    """One request answered from memory, for the access log."""

    method: str
    target: str
    body_bytes: int
    seconds: float


class HotAnswers:
    """The hits to answer at the connection, at most about `memory_bytes` of them (when more
    come, all are dropped: each comes back with its next hit on the full path)."""

    def __init__(
        self, metrics: Metrics, clock: Callable[[], float], still_valid: Callable[[str | None], bool],
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        """`still_valid(authorization)`: whether the client's credentials are still accepted
        (a token this mirror issued expires)."""
        self._metrics = metrics
        self._clock = clock
        self._still_valid = still_valid
        self._memory_bytes = memory_bytes
        self._answers: dict[Key, HotAnswer] = {}
        self._bytes = 0
        self._varies: dict[bytes, Varies | None] = {}  # a request's header lines → what its answer depends on

    def remember(
        self, request: web.BaseRequest, response: web.Response, added: Mapping[str, str],
        again: Callable[[float], bool],
    ) -> None:
        """Keep a 200 the full path made, with the headers `added` as it is sent, if the same
        request can be recognised at the connection. `again(now)` is asked before each answer
        given from here: True if the hit stands (it then records what the hit does), else False."""
        key = _key_of(request)
        body = response.body
        if key is None or not isinstance(body, bytes) or response.status != 200:
            return
        fields = [*response.headers.items(), *added.items(), ("Content-Length", str(len(body))),
                  ("Server", SERVER_SOFTWARE)]
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields)
        if self._bytes + len(head) + len(body) > self._memory_bytes:
            self._answers.clear()
            self._bytes = 0
        self._answers[key] = HotAnswer(head.encode("latin-1"), body, request.headers.get("Authorization"), again)
        self._bytes += len(head) + len(body)

    def answer(self, data: bytes, budget: int) -> tuple[bytes, list[Answered], int]:
        """The responses to the whole requests at the start of `data` that are hits which still
        stand, up to about `budget` bytes of them (one more answer at most), what they were, and
        how many bytes of `data` they took; the caller hands the rest to aiohttp, which waits for a
        client that does not read (a read of pipelined requests could otherwise ask for gigabytes)."""
        out: list[bytes] = []
        answered: list[Answered] = []
        position = size = 0
        now = self._clock()
        while position < len(data) and size < budget:
            started = time.perf_counter()
            match = _REQUEST.match(data, position)
            if match is None:
                break
            method, target, fields = match.groups()
            key = self._key(target, fields)
            hot = self._answers.get(key) if key is not None else None
            if hot is None or not self._still_valid(hot.authorization) or not hot.again(now):
                break
            position = match.end()
            get = method == b"GET"
            out += (hot.head, b"Date: ", rfc822_formatted_time().encode(), b"\r\n\r\n")
            size += len(hot.head)
            if get:
                out.append(hot.body)
                size += len(hot.body)
            seconds = time.perf_counter() - started
            self._metrics.count_request("manifest", method.decode(), "hit", seconds, len(hot.body) if get else None)
            answered.append(Answered(method.decode(), target.decode(), len(hot.body) if get else 0, seconds))
        return b"".join(out), answered, position

    def _key(self, target: bytes, fields: bytes) -> Key | None:
        """The key of a request with these header lines (worked out once per distinct lines)."""
        try:
            varies = self._varies[fields]
        except KeyError:
            if len(self._varies) >= KNOWN_FIELDS:
                self._varies.clear()
            lines = fields.split(b"\r\n")[:-1]
            varies = self._varies[fields] = _varies((name, value) for name, _, value in (line.partition(b":") for line in lines))
        return None if varies is None else (target, varies)


HOT = web.AppKey("hot_answers", HotAnswers)


def whole_requests(data: bytes) -> bool:
    """Whether `data` ends where a request ends, by a test that may say no to some that do:
    it ends with an empty line, and no request in it can have a body or change protocols."""
    if not data.endswith(b"\r\n\r\n"):
        return False
    lowered = data.lower()
    return b"content-length" not in lowered and b"transfer-encoding" not in lowered and b"upgrade" not in lowered


def _key_of(request: web.BaseRequest) -> Key | None:
    """The key of a request aiohttp parsed, None if the connection would not recognise it."""
    if request.method not in ("GET", "HEAD") or request.version != HttpVersion11:
        return None
    if not isinstance(request.transport and request.transport.get_extra_info("peername"), tuple):
        return None  # a worker's socket: forwarded requests are counted and logged by whom they came from
    try:
        target = request.raw_path.encode("ascii")
    except UnicodeEncodeError:
        return None
    varies = _varies(request.raw_headers)
    return None if varies is None else (target, varies)


def _varies(fields: Iterable[tuple[bytes, bytes]]) -> Varies | None:
    """The `Authorization` and `Accept` values among (name, value) header fields; None if a field
    is neither, nor `Connection: keep-alive`, nor IGNORED."""
    authorization: bytes | None = None
    accept: list[bytes] = []
    for raw_name, raw_value in fields:
        name, value = raw_name.lower(), raw_value.strip(b" \t")
        if name == b"accept":
            accept.append(value)
        elif name == b"authorization" and authorization is None:
            authorization = value
        elif name == b"connection" and value.lower() == b"keep-alive":
            continue
        elif name not in IGNORED:
            return None  # If-None-Match, Range, Connection: close, a second Authorization, …
    return authorization or b"", tuple(accept)

