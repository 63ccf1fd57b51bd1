"""The soak's clients, in their own process (`python -m bench.soakload` reads a JSON spec on stdin):
`clients` threads pull images of mixed popularity through the mirror until `until` (epoch seconds),
each request checked and classified. Every `report_every` seconds one JSON line of cumulative
counts goes to stdout; the last line (with `"final": true`) also holds examples of each problem.

A pull: the manifest by tag (bytes compared with upstream's), then the config and each layer,
mostly a whole GET (hashed against its digest), sometimes a Range (compared with the seeded file's
bytes), a HEAD (length checked), or a client that reads a little and hangs up.

Whether content was cached when asked is read from the mirror's data directory: the same file at
the content path before the request, after it and a second later (a refetched copy is a new file;
a file that goes within the second was being evicted). Whether a fault
was on comes from the schedule the orchestrator follows (with `grace` seconds after each).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

from bench.httpclient import Connection, HttpError

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
RETRYABLE = (429, 502, 503)
EVICTION_LAG = 1.0  # seconds: far more than an eviction round takes between dropping rows and files


class Tally:
    """Counts shared by the client threads, and a few examples of each problem."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.slowest_cached_tag: dict[str, float] = {}  # fault (or "none") → seconds

    def add(self, key: str, example: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if example is not None and len(self.examples.setdefault(key, [])) < 5:
                self.examples[key].append(example)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"counts": dict(self.counts), "slowest_cached_tag": dict(self.slowest_cached_tag)}


class Client:
    def __init__(self, spec: dict[str, Any], tally: Tally, index: int) -> None:
        self.spec = spec
        self.tally = tally
        self.rng = random.Random(spec["seed"] * 1000 + index)
        self.conn = Connection(spec["host"], spec["port"], timeout=spec["timeout"])
        self.content = os.path.join(spec["data_dir"], "content", "sha256")

    def _identity(self, digest: str) -> tuple[int, int] | None:
        hexpart = digest.split(":", 1)[1]
        try:
            st = os.stat(os.path.join(self.content, hexpart[:2], hexpart))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _fault(self, start: float, end: float) -> str | None:
        for name, on, off in self.spec["faults"]:
            if start <= off + self.spec["grace"] and end >= on:
                return str(name)
        return None

    def run(self) -> None:
        images = self.spec["images"]
        weights = [1 / (i + 1) for i in range(len(images))]
        while time.time() < self.spec["until"]:
            image = self.rng.choices(images, weights)[0]
            self.request("manifest", image, image["manifest"])
            for blob in image["blobs"]:
                action = self.rng.choices(["get", "range", "head", "leave"], [80, 8, 6, 6])[0]
                self.request(action, image, blob)
            self.tally.add("pulls")
        self.conn.close()

    def request(self, action: str, image: dict[str, Any], blob: dict[str, Any]) -> None:
        """One request, its answer checked, and its outcome counted."""
        digest, size = blob["digest"], blob["size"]
        if action == "manifest":
            path, headers = f"/v2/{image['repo']}/manifests/{image['tag']}", {"Accept": ACCEPT}
        else:
            path, headers = f"/v2/{image['repo']}/blobs/{digest}", {}
        span = None
        if action == "range":
            first = self.rng.randrange(size)
            span = (first, self.rng.randrange(first, size))
            headers = {"Range": f"bytes={span[0]}-{span[1]}"}
        before = self._identity(digest)
        start = time.time()
        status: int | None = None
        body = "ok"
        json_body = False
        try:
            if action == "leave":
                status = self._leave(path)
                body = "left"
            else:
                resp = self.conn.request("HEAD" if action == "head" else "GET", path, headers,
                                         hash_body=action == "get", keep_body=action in ("manifest", "range"))
                status = resp.status
                json_body = "json" in resp.headers.get("content-type", "")
                if status in (200, 206):
                    body = self._check(action, blob, resp.size, resp.digest, resp.body, span, resp.headers)
        except socket.timeout:
            body = "timeout"
            self.conn.close()
        except (OSError, HttpError):
            body = "aborted"
            self.conn.close()
        end = time.time()
        cached = before is not None and before == self._identity(digest)
        if cached and (body in ("aborted", "timeout") or status not in (200, 206)):
            # Eviction drops the index rows a moment before the files: content whose file goes
            # within a second was being evicted, and the mirror no longer had it to give.
            time.sleep(EVICTION_LAG)
            cached = before == self._identity(digest)
        fault = self._fault(start, end)
        self._classify(action, path, status, body, json_body, cached, fault, end - start)

    def _leave(self, path: str) -> int:
        """GET on a fresh connection, read a little of the body, hang up; the status."""
        with socket.create_connection((self.spec["host"], self.spec["port"]), timeout=self.spec["timeout"]) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
            head = s.recv(65536)
        line = head.split(b"\r\n", 1)[0].split()
        if len(line) < 2 or not line[1].isdigit():
            raise HttpError(f"bad status line {head[:40]!r}")
        return int(line[1])

    def _check(self, action: str, blob: dict[str, Any], size: int, digest: str | None, data: bytes | None,
               span: tuple[int, int] | None, headers: dict[str, str]) -> str:
        """'ok' when the answer is upstream's bytes, else 'corrupt'."""
        if action == "head":
            return "ok" if headers.get("content-length") == str(blob["size"]) else "corrupt"
        if action == "get":
            return "ok" if digest == blob["digest"] and size == blob["size"] else "corrupt"
        if action == "manifest":
            return "ok" if data is not None and hashlib.sha256(data).hexdigest() == blob["digest"][7:] else "corrupt"
        assert span is not None and data is not None
        first, last = span
        if "content-range" not in headers:  # the whole blob (a 200 to the Range)
            first, last = 0, blob["size"] - 1
        with open(blob["path"], "rb") as f:
            f.seek(first)
            return "ok" if data == f.read(last - first + 1) else "corrupt"

    def _classify(self, action: str, path: str, status: int | None, body: str, json_body: bool, cached: bool,
                  fault: str | None, took: float) -> None:
        t = self.tally
        t.add("requests")
        t.add(f"status {status}" if status is not None else "no answer")
        if action == "manifest" and cached and status == 200:
            with t.lock:
                key = fault or "none"
                t.slowest_cached_tag[key] = max(t.slowest_cached_tag.get(key, 0.0), took)
        example = f"{action} {path} → {status} {body} (cached {cached}, fault {fault}, {took:.2f}s)"
        failed = body in ("aborted", "timeout") or status not in (200, 206)
        if body == "corrupt":
            t.add("corrupt body", example)
        elif status == 404:
            t.add("404 for content upstream has", example)
        elif status is not None and status >= 500 and status not in RETRYABLE:
            t.add(f"{status} (never allowed)", example)
        elif failed and cached:
            t.add("failure of cached content", example)
        elif failed and fault is None:
            t.add("failure with no fault on", example)
        elif failed and body == "timeout":
            t.add("client timeout", example)
        elif failed and status is not None and status not in (200, 206) and not (
                status in RETRYABLE and (json_body or action in ("head", "leave"))):  # no body to look at
            t.add("failure that is not a retryable OCI error", example)
        elif failed:
            t.add(f"retryable during {fault}")


def main() -> int:
    spec = json.loads(sys.stdin.read())
    tally = Tally()
    clients = [Client(spec, tally, i) for i in range(spec["clients"])]
    threading.stack_size(512 * 1024)
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(spec["report_every"])
        print(json.dumps({"at": time.time(), **tally.snapshot()}), flush=True)
    print(json.dumps({"at": time.time(), "final": True, "examples": tally.examples, **tally.snapshot()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
