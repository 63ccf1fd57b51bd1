"""A lean blocking HTTP/1.1 client: keep-alive, Content-Length / chunked / close-delimited
bodies read with `recv_into` a reused 1 MiB buffer (so the client's CPU stays small next to
the server's), optional sha256 of the body, and time to first and last byte."""
from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field

BUFSIZE = 1 << 20


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    size: int = 0
    ttfb: float = 0.0       # seconds from sending the request to the first response byte
    total: float = 0.0      # seconds from sending the request to the last body byte
    digest: str | None = None
    body: bytes | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Connection:
    def __init__(self, host: str, port: int, timeout: float = 300.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray(BUFSIZE)
        self._view = memoryview(self._buf)
        self._pending = b""  # bytes read past the previous parse point

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._pending = b""

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._pending = b""

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, *,
                hash_body: bool = False, keep_body: bool = False) -> Response:
        """One request; on a reused connection that the server closed meanwhile, retry once."""
        reused = self.sock is not None
        try:
            return self._request(method, path, headers, hash_body, keep_body)
        except (ConnectionError, _Closed):
            self.close()
            if not reused:
                raise
            return self._request(method, path, headers, hash_body, keep_body)

    def _request(self, method: str, path: str, headers: dict[str, str] | None, hash_body: bool,
                 keep_body: bool) -> Response:
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "User-Agent: mirror-bench"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        start = time.perf_counter()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, ttfb = self._read_head(start)
        status, resp_headers = _parse_head(head)
        resp = Response(status, resp_headers, ttfb=ttfb)
        hasher = hashlib.sha256() if hash_body else None
        chunks: list[bytes] | None = [] if keep_body else None

        def sink(data: memoryview | bytes) -> None:
            resp.size += len(data)
            if hasher is not None:
                hasher.update(data)
            if chunks is not None:
                chunks.append(bytes(data))

        te = resp_headers.get("transfer-encoding", "").lower()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "chunked" in te:
            self._read_chunked(sink)
        elif "content-length" in resp_headers:
            self._read_exact(int(resp_headers["content-length"]), sink)
        else:
            self._read_to_close(sink)
            self.close()
        resp.total = time.perf_counter() - start
        if hasher is not None:
            resp.digest = "sha256:" + hasher.hexdigest()
        if chunks is not None:
            resp.body = b"".join(chunks)
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return resp

    # -- reading ------------------------------------------------------------------------
    def _recv(self) -> memoryview:
        assert self.sock is not None
        n = self.sock.recv_into(self._buf)
        if n == 0:
            raise _Closed("connection closed by the server")
        return self._view[:n]

    def _read_head(self, start: float) -> tuple[bytes, float]:
        data = bytearray(self._pending)
        self._pending = b""
        ttfb = time.perf_counter() - start if data else 0.0
        while b"\r\n\r\n" not in data:
            if len(data) > 1 << 16:
                raise HttpError("response head larger than 64 KiB")
            got = self._recv()
            if not ttfb:
                ttfb = time.perf_counter() - start
            data += got
        end = data.index(b"\r\n\r\n") + 4
        self._pending = bytes(data[end:])
        return bytes(data[:end]), ttfb

    def _read_exact(self, n: int, sink) -> None:  # type: ignore[no-untyped-def]
        if self._pending:
            take = self._pending[:n]
            self._pending = self._pending[n:]
            sink(take)
            n -= len(take)
        assert self.sock is not None
        while n > 0:
            got = self.sock.recv_into(self._buf, min(n, BUFSIZE))
            if got == 0:
                raise HttpError(f"connection closed with {n} body bytes missing")
            sink(self._view[:got])
            n -= got

    def _read_to_close(self, sink) -> None:  # type: ignore[no-untyped-def]
        if self._pending:
            sink(self._pending)
            self._pending = b""
        assert self.sock is not None
        while got := self.sock.recv_into(self._buf):
            sink(self._view[:got])

    def _readline(self) -> bytes:
        data = bytearray(self._pending)
        while b"\r\n" not in data:
            data += self._recv()
        end = data.index(b"\r\n") + 2
        self._pending = bytes(data[end:])
        return bytes(data[: end - 2])

    def _read_chunked(self, sink) -> None:  # type: ignore[no-untyped-def]
        while True:
            size = int(self._readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self._readline():  # trailers, then the empty line
                    pass
                return
            self._read_exact(size, sink)
            self._read_exact(2, lambda _d: None)


class _Closed(ConnectionError):
    pass


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


def get(url_host: str, port: int, path: str, headers: dict[str, str] | None = None, *,
        hash_body: bool = False, keep_body: bool = False, timeout: float = 300.0) -> Response:
    """One request on a fresh connection."""
    with Connection(url_host, port, timeout) as conn:
        return conn.request("GET", path, headers, hash_body=hash_body, keep_body=keep_body)


def status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of a GET (body read and dropped), or None when nothing answers."""
    try:
        return get(host, port, path, timeout=timeout).status
    except (OSError, HttpError):
        return None
