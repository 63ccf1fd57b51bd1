"""The scenarios: what is measured, against which systems, and how.

Each scenario runs per system and returns a `Cell`: every metric's values (one per repetition),
the system's peak RSS over the scenario, and any error. Systems are restarted with an empty cache
wherever "cold" matters; the direct upstream is never restarted (it is the origin).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench import httpclient
from bench.procs import RssMonitor
from bench.seed import BLOB_REPO, MANIFEST_ACCEPT, Image
from bench.systems import Direct, Mirror, System

if TYPE_CHECKING:
    from bench.cli import Bench

CACHES = ("distribution", "drayage", "mirror")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str                      # "lower", "higher" or "exact" (no ratios)
    fmt: str = "{:.2f}"
    systems: tuple[str, ...] | None = None   # None: every system of the scenario
    of_total: bool = False           # shown as "value/total" (e.g. verified bodies)


@dataclass
class Cell:
    values: dict[str, list[float]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    rss_tree_mib: float | None = None
    rss_proc_mib: float | None = None
    error: str | None = None
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(float(value))


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    systems: tuple[str, ...]
    limit: str | None                # the physical limit the ratios refer to
    metrics: tuple[Metric, ...]
    run: Callable[["Bench", System, Cell], None]
    needs: tuple[str, ...] = ()      # binaries, besides the systems'


RSS = Metric("rss", "peak RSS, MiB", "lower", "{:.0f}")
WRK_METRICS = (
    Metric("rps", "requests/s", "higher", "{:.0f}"),
    Metric("p50", "p50 latency, ms", "lower", "{:.2f}"),
    Metric("p99", "p99 latency, ms", "lower", "{:.2f}"),
    Metric("errors", "errors (non-2xx, socket)", "exact", "{:.0f}"),
    RSS,
)


# --- helpers --------------------------------------------------------------------------------

def quiesce() -> None:
    """Flush dirty pages (a cache that just wrote a big file without fsync leaves the kernel
    writing it back) so that writeback does not land in the next measurement, whoever caused it."""
    os.sync()
    time.sleep(0.2)


def _blob_path(digest: str, repo: str = BLOB_REPO) -> str:
    return f"/v2/{repo}/blobs/{digest}"


def _restartable(system: System) -> bool:
    return not isinstance(system, Direct)


def _get_checked(system: System, path: str, size: int, digest: str | None = None,
                 headers: dict[str, str] | None = None) -> httpclient.Response:
    resp = httpclient.get(system.host, system.port, path, headers, hash_body=digest is not None)
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: status {resp.status}")
    if resp.size != size:
        raise RuntimeError(f"GET {path}: {resp.size} bytes, expected {size}")
    if digest is not None and resp.digest != digest:
        raise RuntimeError(f"GET {path}: body hashes to {resp.digest}, expected {digest}")
    return resp


def _warm_get(system: System, cell: Cell, path: str, size: int, digest: str,
              headers: dict[str, str] | None = None, attempts: int = 3) -> None:
    """The GET that fills the cache, body verified. A failure is retried (as a client would) and
    noted, so one flaky miss does not hide the hit figures, while the report still shows it."""
    for attempt in range(1, attempts + 1):
        try:
            _get_checked(system, path, size, digest, headers)
            return
        except RuntimeError as exc:
            cell.notes.append(f"warming GET attempt {attempt}/{attempts} failed: {exc}")
            if attempt == attempts:
                raise
            time.sleep(0.2)


def _start_warmed(system: System, cell: Cell, warm: Callable[[], None], starts: int = 3) -> None:
    """Start `system` with an empty cache and fill it with `warm()`. When warming fails even after
    its own retries, the system is restarted (a failure can stick to one process); every failure
    stays in the notes, so the hit figures are measured without hiding the miss-path problem."""
    for attempt in range(1, starts + 1):
        system.start(fresh=True)
        try:
            warm()
            return
        except RuntimeError as exc:
            system.stop()
            cell.notes.append(f"warming failed in process {attempt}/{starts}: {exc}")
            if attempt == starts:
                raise


def run_loadgen(spec: dict[str, object], timeout: float = 1800) -> dict[str, object]:
    """The concurrent client, in its own process (see bench/loadgen.py)."""
    out = subprocess.run([sys.executable, "-m", "bench.loadgen"], input=json.dumps(spec), capture_output=True,
                         text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


# --- cold 512 MiB blob ---------------------------------------------------------------------------

def hash_time(path: Path) -> float:
    """Seconds to sha256 the file (read from the page cache, 1 MiB at a time): what verifying the
    blob costs one core, the floor of a cold fetch along with the transfer."""
    h = hashlib.sha256()
    began = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return time.perf_counter() - began


def run_cold(b: "Bench", system: System, cell: Cell) -> None:
    blob = b.seeded.big
    for rep in range(b.repeat):
        if _restartable(system):
            system.start(fresh=True)
        try:
            quiesce()
            mark = b.upstream.mark()
            resp = _get_checked(system, _blob_path(blob.digest), blob.size)
            cell.add("ttlb", resp.total)
            cell.add("ttfb", resp.ttfb * 1000)
            cell.add("sha256", hash_time(blob.path))  # the limit a verifying cache cannot beat, measured alike
            if system.name != "direct":
                cell.add("upstream_gets", b.upstream.settle(mark, blob.digest))
            b.log(f"cold {system.name} {rep + 1}/{b.repeat}: {resp.total:.2f}s, first byte {resp.ttfb * 1000:.1f}ms")
        finally:
            if _restartable(system):
                system.stop()


# --- warm 512 MiB blob -----------------------------------------------------------------------------

def run_warm(b: "Bench", system: System, cell: Cell) -> None:
    blob = b.seeded.big
    path = _blob_path(blob.digest)
    system.start(fresh=True)
    try:
        mark = b.upstream.mark()
        _warm_get(system, cell, path, blob.size, blob.digest)
        if system.name in CACHES:
            b.upstream.settle(mark, blob.digest)
        quiesce()
        for rep in range(b.repeat):
            resp = _get_checked(system, path, blob.size)
            mbps = blob.size / resp.total / 1e6
            cell.add("mbps", mbps)
            b.log(f"warm {system.name} {rep + 1}/{b.repeat}: {mbps:.0f} MB/s")
    finally:
        system.stop()


# --- 50 concurrent cold GETs of one blob -------------------------------------------------------------

def run_concurrent(b: "Bench", system: System, cell: Cell) -> None:
    blob = b.seeded.shared
    path = _blob_path(blob.digest)
    n = b.concurrency
    cell.totals["verified"] = n
    for rep in range(b.repeat):
        system.start(fresh=True)
        try:
            if system.name == "nginx":  # the reference serves them warm: file in the page cache
                _get_checked(system, path, blob.size)
            quiesce()
            mark = b.upstream.mark()
            res = run_loadgen({"mode": "concurrent", "host": system.host, "port": system.port, "path": path,
                               "n": n, "digest": blob.digest, "size": blob.size})
            cell.add("wall", float(res["wall"]))  # type: ignore[arg-type]
            cell.add("verified", float(res["ok"]))  # type: ignore[arg-type]
            if res["error_count"]:
                cell.notes.append(f"{res['error_count']} of {n} GETs failed, e.g. {res['errors'][:2]}")  # type: ignore[index]
            gets = None
            if system.name != "nginx":
                gets = b.upstream.settle(mark, blob.digest)
                cell.add("upstream_gets", gets)
            b.log(f"concurrent {system.name} {rep + 1}/{b.repeat}: {res['wall']:.2f}s, "
                  f"{res['ok']}/{n} verified, upstream GETs {gets}")
        finally:
            system.stop()


# --- 200 concurrent warm pulls of a 20-layer image -------------------------------------------------------

def pull_spec(img: Image, host: str, port: int, n: int, verify_every: int) -> dict[str, object]:
    """The loadgen spec of `n` concurrent pulls of `img` from host:port (every `verify_every`-th hashed)."""
    return {
        "mode": "pulls", "host": host, "port": port, "n": n, "verify_every": verify_every,
        "manifest_path": f"/v2/{img.repo}/manifests/{img.tag}", "manifest_digest": img.digest,
        "accept": MANIFEST_ACCEPT,
        "blobs": [[_blob_path(x.digest, img.repo), x.digest, x.size] for x in img.blobs],
    }


def run_pulls(b: "Bench", system: System, cell: Cell) -> None:
    n = b.pulls
    cell.totals["ok"] = n
    mark = b.upstream.mark()

    def warm_pull() -> None:
        for attempt in range(1, 4):  # one pull fills the cache, every body verified
            warm = run_loadgen(pull_spec(b.seeded.image, system.host, system.port, 1, 1))
            if warm["ok"] == 1:
                return
            cell.notes.append(f"warming pull attempt {attempt}/3 failed: {warm['errors']}")
            if attempt == 3:
                raise RuntimeError(f"warming pull failed: {warm['errors']}")
            time.sleep(0.2)

    _start_warmed(system, cell, warm_pull)
    try:
        if system.name in CACHES:
            b.upstream.settle(mark, b.seeded.image.blobs[-1].digest, quiet=0.5)
        quiesce()
        for rep in range(b.repeat):
            res = run_loadgen(pull_spec(b.seeded.image, system.host, system.port, n, 10))
            cell.add("wall", float(res["wall"]))  # type: ignore[arg-type]
            cell.add("ok", float(res["ok"]))  # type: ignore[arg-type]
            if res["p99"] is not None:
                cell.add("p99", float(res["p99"]))  # type: ignore[arg-type]
            cell.add("mbps", float(res["bytes"]) / float(res["wall"]) / 1e6)  # type: ignore[arg-type]
            if res["error_count"]:
                cell.notes.append(f"{res['error_count']} of {n} pulls failed, e.g. {res['errors'][:2]}")  # type: ignore[index]
            b.log(f"pulls {system.name} {rep + 1}/{b.repeat}: {res['wall']:.2f}s, {res['ok']}/{n} ok, "
                  f"{res['hashed']} bodies hashed")
    finally:
        system.stop()


# --- manifest hits with wrk ------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) and errors (non-2xx/3xx + socket errors) from `wrk --latency`."""
    res: dict[str, float] = {}
    if m := re.search(r"Requests/sec:\s*([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        if m := re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.M):
            res[key] = _ms(m.group(1))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    res["errors"] = errors
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = float(m.group(1))
    if "rps" not in res or "p99" not in res:
        raise RuntimeError(f"unexpected wrk output:\n{out[-800:]}")
    return res


def _run_manifests(b: "Bench", system: System, cell: Cell, by: str) -> None:
    img = b.seeded.image
    ref = img.tag if by == "tag" else img.digest
    path = f"/v2/{img.repo}/manifests/{ref}"
    _start_warmed(system, cell, lambda: _warm_get(system, cell, path, len(img.manifest), img.digest,
                                                  {"Accept": MANIFEST_ACCEPT}))
    try:
        quiesce()
        url = f"http://{system.host}:{system.port}{path}"
        for rep in range(b.repeat):
            argv = ["wrk", f"-t{b.wrk_threads}", f"-c{b.wrk_connections}", f"-d{b.wrk_seconds}s", "--latency",
                    "-H", f"Accept: {MANIFEST_ACCEPT}", url]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=b.wrk_seconds + 60)
            if out.returncode != 0:
                raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr.strip()[-300:]}")
            res = parse_wrk(out.stdout)
            for key in ("rps", "p50", "p99", "errors"):
                cell.add(key, res[key])
            if res["errors"]:
                cell.notes.append(f"wrk: {res['errors']:.0f} errors (non-2xx or socket) of {res.get('requests', 0):.0f}")
            b.log(f"manifest-{by} {system.name} {rep + 1}/{b.repeat}: {res['rps']:.0f} req/s, "
                  f"p50 {res['p50']:.2f}ms, p99 {res['p99']:.2f}ms, errors {res['errors']:.0f}")
    finally:
        system.stop()


def run_manifest_tag(b: "Bench", system: System, cell: Cell) -> None:
    _run_manifests(b, system, cell, "tag")


def run_manifest_digest(b: "Bench", system: System, cell: Cell) -> None:
    _run_manifests(b, system, cell, "digest")


# --- mirror start-up with many cached objects ----------------------------------------------------------

def make_cached_store(data_dir: str, objects: str, upstream: str = "docker.io",
                      repo: str = "library/benchstart") -> None:
    """`objects` small content files at the mirror's layout, each with its content row and link,
    written with the mirror's own schema (mirror/storage/metadata/schema.py, mirror/storage/filestore.py):
    images of a manifest and up to 9 blobs it references (a config and layers)."""
    from mirror.storage.filestore import FileStore
    from mirror.storage.metadata.schema import SCHEMA, SCHEMA_VERSION

    store = FileStore(Path(data_dir))
    store.prepare()
    rng = random.Random(7)
    now = time.time()
    content, links = [], []
    made_dirs: set[Path] = set()

    def put(data: bytes, kind: str, media: str | None, at: float) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = store.path(digest)
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
        content.append((digest, len(data), media, kind, at, at))
        links.append((upstream, repo, digest))
        return digest

    made, total = 0, int(objects)
    while made < total:
        at = now - rng.random() * 86_400 * 30  # used some time in the last month
        blobs = [(d, len(data)) for data in (rng.randbytes(96) + (made + i).to_bytes(8, "big")
                                               for i in range(min(9, total - made - 1)))
                 for d in [put(data, "blob", None, at)]]
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": blobs[0][0],
                       "size": blobs[0][1]} if blobs else {},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d, "size": n}
                       for d, n in blobs[1:]],
        }).encode()
        put(manifest, "manifest", "application/vnd.docker.distribution.manifest.v2+json", at)
        made += len(blobs) + 1
    db = sqlite3.connect(Path(data_dir) / "index.db")
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        if db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        db.executemany("INSERT INTO content (digest, size, media_type, kind, created_at, last_access)"
                       " VALUES (?, ?, ?, ?, ?, ?)", content)
        db.executemany("INSERT INTO links (upstream, repo, digest) VALUES (?, ?, ?)", links)
        db.commit()
    finally:
        db.close()


def time_eviction_plan(data_dir: str) -> None:
    """Print the seconds an eviction pass of the mirror under test takes to plan over `data_dir`:
    the first pass after a start (every manifest read and parsed) and the next (manifests known),
    each from reading the content rows to the ordered plan (mirror/cache/eviction.py)."""
    import asyncio
    from mirror.cache.eviction import plan_images
    from mirror.storage.filestore import FileStore
    from mirror.storage.metadata import Metadata

    async def measure() -> list[float]:
        metadata = Metadata(Path(data_dir) / "index.db")
        await metadata.open()
        try:
            store, known, times = FileStore(Path(data_dir)), None, []
            for _ in range(2):
                began = time.perf_counter()
                plan = plan_images(await metadata.content.usage(), store, known)
                times.append(time.perf_counter() - began)
                known = plan.children
            return times
        finally:
            await metadata.close()

    print(json.dumps(asyncio.run(measure())))


def _in_mirror_process(system: Mirror, function: str, *args: str) -> str:
    """Run a function of this module in a child process whose `mirror` is the one under test."""
    code = f"import sys; from bench.scenarios import {function} as f; f(*sys.argv[1:])"
    pythonpath = os.pathsep.join([str(system.src), str(Path(__file__).resolve().parent.parent)])
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": pythonpath}, cwd=system.src)
    if out.returncode != 0:
        raise RuntimeError(f"{function} failed: {out.stderr.strip()[-600:]}")
    return out.stdout


def run_startup(b: "Bench", system: System, cell: Cell) -> None:
    assert isinstance(system, Mirror)
    data = b.workdir / f"startup-{b.startup_objects}"
    if not (data / "index.db").exists():
        t0 = time.monotonic()
        _in_mirror_process(system, "make_cached_store", str(data), str(b.startup_objects))  # its schema, its layout
        b.log(f"startup: generated {b.startup_objects} cached objects in {time.monotonic() - t0:.1f}s")
    cell.totals["objects"] = b.startup_objects
    for rep in range(b.repeat):
        elapsed = system.start(fresh=False, data_dir=data, timeout=300)
        system.stop()
        cell.add("startup", elapsed)
        empty = system.start(fresh=True)
        system.stop()
        cell.add("startup_empty", empty)
        first, again = json.loads(_in_mirror_process(system, "time_eviction_plan", str(data)))
        cell.add("plan", first)
        cell.add("replan", again)
        b.log(f"startup mirror {rep + 1}/{b.repeat}: {elapsed:.2f}s with {b.startup_objects} objects, "
              f"{empty:.2f}s empty; eviction plan {first:.2f}s, again {again:.2f}s")
    objects = len(list((data / "content" / "sha256").glob("*/*")))
    if objects != b.startup_objects:
        cell.notes.append(f"after start-up the store holds {objects} files, not {b.startup_objects}")


# --- the list ------------------------------------------------------------------------------------------------

ALL_SYSTEMS = ("nginx", "direct", "distribution", "drayage", "mirror")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("cold", "cold blob GET (empty cache each repetition)", ("direct", "distribution", "drayage", "mirror"),
             "direct", (
                 Metric("ttlb", "time to last byte, s", "lower", "{:.2f}"),
                 Metric("ttfb", "time to first byte, ms", "lower", "{:.1f}"),
                 Metric("sha256", "sha256 of the blob on one core, s", "lower", "{:.2f}", systems=("direct",)),
                 Metric("upstream_gets", "upstream GETs of the blob", "exact", "{:.0f}", systems=CACHES),
                 RSS,
             ), run_cold),
    Scenario("warm", "warm blob GET (after one warming GET)", ALL_SYSTEMS, "nginx", (
        Metric("mbps", "throughput, MB/s", "higher", "{:.0f}"),
        RSS,
    ), run_warm),
    Scenario("concurrent", "concurrent cold GETs of one blob (nginx: warm, the reference)", ALL_SYSTEMS, "nginx", (
        Metric("wall", "wall time, s", "lower", "{:.2f}"),
        Metric("upstream_gets", "upstream GETs of the blob", "exact", "{:.0f}",
               systems=("direct",) + CACHES),
        Metric("verified", "bodies verified (sha256)", "exact", "{:.0f}", of_total=True),
        RSS,
    ), run_concurrent),
    Scenario("pulls", "concurrent warm pulls of the multi-layer image", ALL_SYSTEMS, "nginx", (
        Metric("wall", "wall time, s", "lower", "{:.2f}"),
        Metric("p99", "p99 pull time, s", "lower", "{:.2f}"),
        Metric("mbps", "throughput, MB/s", "higher", "{:.0f}"),
        Metric("ok", "pulls complete (sizes checked, every 10th hashed)", "exact", "{:.0f}", of_total=True),
        RSS,
    ), run_pulls),
    Scenario("manifest-tag", "manifest GET by tag, within TTL (wrk)", ("direct", "distribution", "drayage", "mirror"),
             None, WRK_METRICS, run_manifest_tag, needs=("wrk",)),
    Scenario("manifest-digest", "manifest GET by digest (wrk)", ("direct", "distribution", "drayage", "mirror"),
             None, WRK_METRICS, run_manifest_digest, needs=("wrk",)),
    Scenario("startup", "mirror start-up until /readyz answers 200", ("mirror",), None, (
        Metric("startup", "start-up with N cached objects, s", "lower", "{:.2f}"),
        Metric("startup_empty", "start-up with an empty cache, s", "lower", "{:.2f}"),
        Metric("plan", "eviction plan over them, first pass (every manifest read), s", "lower", "{:.2f}"),
        Metric("replan", "eviction plan over them, next passes (manifests known), s", "lower", "{:.2f}"),
        RSS,
    ), run_startup),
)

BY_NAME = {s.name: s for s in SCENARIOS}


def run_cell(b: "Bench", scenario: Scenario, system: System) -> Cell:
    """Run one scenario on one system, sampling its RSS throughout; errors land in the cell."""
    cell = Cell()
    monitor = RssMonitor(system.pid, owned=system.owned)
    try:
        with monitor:
            scenario.run(b, system, cell)
    except Exception as exc:  # noqa: BLE001 - one broken system must not stop the run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cell.error = f"{type(exc).__name__}: {first}"[:200]
        detail = getattr(exc, "detail", None)
        extra = f"; end of its log: {' ⏎ '.join(detail.splitlines()[-6:])}" if detail else ""
        cell.notes.append(f"{scenario.name} failed: {type(exc).__name__}: {str(exc).strip()}{extra}"[:1500])
        b.log(f"{scenario.name} {system.name}: ERROR {cell.error}")
    finally:
        try:
            system.stop()
        except Exception as exc:  # noqa: BLE001
            cell.notes.append(f"stop failed: {exc}")
    if monitor.tree_kib:
        cell.rss_tree_mib = monitor.tree_mib
        cell.rss_proc_mib = monitor.proc_mib
        cell.add("rss", monitor.tree_mib)
    if os.environ.get("BENCH_DEBUG"):
        b.log(f"{scenario.name} {system.name}: {cell}")
    return cell
