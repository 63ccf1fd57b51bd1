"""The concurrent client, run in its own process (`python -m bench.loadgen` reads a JSON spec on
stdin, writes a JSON result on stdout) so its CPU is not the orchestrator's.

Lean on purpose (the machine may have 2 cores): one thread per concurrent client with a
blocking keep-alive connection reading into a reused 1 MiB buffer; hashlib releases the GIL on
large updates, and so do socket reads. All clients are released together by a barrier.

Modes:
- `concurrent`: `n` clients GET one blob at once, each body hashed and compared with `digest`.
- `pulls`: `n` clients each pull an image: manifest by tag (digest checked), then every blob in
  order on the same connection; sizes always checked, bodies hashed for every
  `verify_every`-th client.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable

from bench.httpclient import Connection, HttpError


def _release(barrier: threading.Barrier) -> float:
    """Start every client at once; the start time (clients that failed to connect broke it)."""
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    return time.perf_counter()


Work = Callable[[int, Connection], dict[str, Any]]


def _run_clients(spec: dict[str, Any], work: Work) -> tuple[list[dict[str, Any]], float]:
    """`n` clients, each connected first and then released together to do `work`; their results
    (`ok`, `end`, … or `error`) and the wall time from the release to the last `end`."""
    n = int(spec["n"])
    barrier = threading.Barrier(n + 1)
    results: list[dict[str, Any]] = [{} for _ in range(n)]

    def client(i: int) -> None:
        conn = Connection(spec["host"], int(spec["port"]), timeout=float(spec.get("timeout", 600)))
        passed = False
        try:
            conn._connect()
            barrier.wait()
            passed = True
            results[i] = work(i, conn)
        except (OSError, HttpError, threading.BrokenBarrierError) as exc:
            if not passed:
                barrier.abort()  # so nobody waits forever for a client that will never come
            results[i] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "end": time.perf_counter()}
        finally:
            conn.close()

    threading.stack_size(512 * 1024)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = _release(barrier)
    for t in threads:
        t.join()
    return results, max((r.get("end", t0) for r in results), default=t0) - t0


def _concurrent(spec: dict[str, Any]) -> dict[str, Any]:
    def get(i: int, conn: Connection) -> dict[str, Any]:
        started = time.perf_counter()
        resp = conn.request("GET", spec["path"], hash_body=True)
        ok = resp.status == 200 and resp.digest == spec["digest"] and resp.size == int(spec["size"])
        return {"ok": ok, "status": resp.status, "ttfb": resp.ttfb, "total": resp.total,
                "end": started + resp.total, "size": resp.size}

    results, wall = _run_clients(spec, get)
    errors = [r.get("error") or f"status {r.get('status')}, size {r.get('size')}" for r in results if not r.get("ok")]
    return {
        "wall": wall,
        "ok": sum(1 for r in results if r.get("ok")),
        "n": len(results),
        "ttfb_max": max((r.get("ttfb", 0.0) for r in results), default=0.0),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def _pulls(spec: dict[str, Any]) -> dict[str, Any]:
    every = max(1, int(spec.get("verify_every", 10)))
    accept = {"Accept": spec["accept"]}

    def pull(i: int, conn: Connection) -> dict[str, Any]:
        verify = i % every == 0
        started = time.perf_counter()
        resp = conn.request("GET", spec["manifest_path"], accept, hash_body=True)
        if resp.status != 200 or resp.digest != spec["manifest_digest"]:
            raise HttpError(f"manifest: status {resp.status}, digest {resp.digest}")
        got = resp.size
        hashed = 1
        for path, digest, size in spec["blobs"]:
            resp = conn.request("GET", path, hash_body=verify)
            if resp.status != 200 or resp.size != size or (verify and resp.digest != digest):
                raise HttpError(f"{path}: status {resp.status}, {resp.size} bytes, digest {resp.digest}")
            got += resp.size
            hashed += verify
        end = time.perf_counter()
        return {"ok": True, "time": end - started, "end": end, "bytes": got, "hashed": hashed}

    results, wall = _run_clients(spec, pull)
    times = sorted(r["time"] for r in results if r.get("ok"))
    errors = [r["error"] for r in results if not r.get("ok")]
    return {
        "wall": wall,
        "ok": len(times),
        "n": len(results),
        "p50": times[len(times) // 2] if times else None,
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None,
        "bytes": sum(r.get("bytes", 0) for r in results),
        "hashed": sum(r.get("hashed", 0) for r in results),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def main() -> int:
    spec = json.loads(sys.stdin.read())
    mode = spec["mode"]
    result = _concurrent(spec) if mode == "concurrent" else _pulls(spec)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
