"""`python -m bench.fleet`: the S3 content store and the fleet, measured side by side in one run.

1. One mirror process with the filesystem store against one with the S3 store (JuiceFS's S3
   gateway on loopback), same settings otherwise, and the direct upstream GET as the reference:
   a cold blob (first and last byte, and when it is stored fleet-wide: published to the bucket,
   or stored locally for the filesystem store), warm local hits, and a second S3 replica with an
   empty data directory getting the blob from the bucket (no upstream GET). CPU seconds per GB
   served for the mirror's process tree and, with S3, the gateway's.
2. One S3 replica against three behind haproxy (deploy/fleet/haproxy.cfg): concurrent warm pulls
   of the seeded image, and concurrent cold GETs of one blob; CPU seconds per GB for all of the
   mirrors, haproxy and the gateway.

Prints the tables and appends a section to bench/RESULTS.md (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from bench import cpu
from bench.cli import DEFAULT_OUT, mirror_source
from bench.fleetreport import Results, section, tables
from bench.httpclient import Response
from bench.procs import exit_on_sigterm, stop_all
from bench.replicas import Replicas, metric_total, wait_stored
from bench.report import command_line
from bench.scenarios import Cell, _blob_path, _get_checked, pull_spec, quiesce, run_loadgen
from bench.seed import BlobFile, Seeded, seed
from bench.systems import MIRROR_LOG_PROBLEMS, Direct, Mirror, System, UpstreamRegistry, _grep, _which
from tests.integration.s3 import S3Gateway, juicefs_binary

MiB = 1024 * 1024
GB = 1e9
FLEET_SIZE = 3  # deploy/fleet/haproxy.cfg names three replicas
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


@dataclass
class Run:
    """What every measurement needs."""

    workdir: Path
    upstream: UpstreamRegistry
    seeded: Seeded
    gateway: S3Gateway
    mirror_src: Path
    haproxy: str
    repeat: int
    warm_gets: int
    pulls: int
    concurrency: int
    log: Callable[[str], None]
    results: Results = field(default_factory=dict)

    def cell(self, case: str, system: str) -> Cell:
        return self.results.setdefault(case, {}).setdefault(system, Cell())

    def s3_toml(self) -> str:
        """The `[storage]` tables of the S3 store under a fresh prefix: an empty bucket."""
        return self.gateway.toml(f"bench-{secrets.token_hex(4)}/")

    def gateway_group(self) -> cpu.Groups:
        pid = self.gateway.pid
        if pid is None:
            raise RuntimeError(f"the S3 gateway is not running: {self.gateway.log_tail(5)}")
        return {"gateway": [pid]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blob-mib", type=int, default=512, help="size of the cold/warm/bucket blob (default 512)")
    p.add_argument("--shared-mib", type=int, default=128, help="size of the concurrently fetched blob (default 128)")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent cold GETs of one blob (default 50)")
    p.add_argument("--pulls", type=int, default=200, help="concurrent warm pulls of the image (default 200)")
    p.add_argument("--layers", type=int, default=20, help="layers of the pulled image (default 20)")
    p.add_argument("--layer-kib", type=int, default=1024, help="size of each layer (default 1024 KiB)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    p.add_argument("--warm-gets", type=int, default=3, help="warm GETs per repetition (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repetition (smoke test)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"results file the section is appended to (default {DEFAULT_OUT})")
    p.add_argument("--json", type=Path, help="also write the raw figures there")
    p.add_argument("--mirror-src", type=Path,
                   help="directory holding the `mirror` package to benchmark (default: this checkout)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data) for inspection")
    return p


def _log(message: str) -> None:
    print(f"[bench.fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.blob_mib, args.shared_mib, args.layer_kib = 4, 2, 16
        args.pulls, args.concurrency, args.repeat, args.warm_gets = 20, 5, 1, 1
    registry, haproxy = _which("docker-registry"), _which("haproxy") or _which("/usr/sbin/haproxy")
    if registry is None or haproxy is None:
        print("bench.fleet: needs docker-registry (the upstream) and haproxy (apt-get install docker-registry haproxy)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    command = command_line(argv if argv is not None else sys.argv[1:], module="bench.fleet")
    workdir = Path(tempfile.mkdtemp(prefix="mirror-bench-fleet-"))
    started, load_before = time.time(), os.getloadavg()
    busy_before, own_before = cpu.machine_busy(), cpu.own_and_reaped()
    _log(f"work directory {workdir}")
    gateway = S3Gateway(workdir / "s3", juicefs_binary())
    run: Run | None = None
    log_notes: list[str] = []
    try:
        upstream = UpstreamRegistry(workdir / "upstream", registry)
        upstream.start()
        seeded = seed(upstream.host, upstream.port, workdir / "files", args.blob_mib * MiB, args.shared_mib * MiB,
                      args.layers, args.layer_kib * 1024)
        gateway.format()
        gateway.start()
        src, provenance = mirror_source(args.mirror_src, workdir)
        _log(f"seeded {upstream.url}; S3 gateway {gateway.endpoint_url}; mirror under test: {provenance}")
        run = Run(workdir, upstream, seeded, gateway, src, haproxy, args.repeat, args.warm_gets, args.pulls,
                  args.concurrency, _log)
        _measure(run)
        upstream.stop()
        log_notes = _log_problems(workdir)
    finally:
        gateway.stop()
        stop_all()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    # Every process the run started has ended and been reaped: what the machine's CPUs did besides
    # is other work, which would have competed with the measurements.
    others = cpu.machine_busy() - busy_before - (cpu.own_and_reaped() - own_before)
    results = run.results if run is not None else {}
    params: dict[str, object] = {
        "blob_mib": args.blob_mib, "shared_mib": args.shared_mib, "concurrency": args.concurrency,
        "pulls": args.pulls, "layers": args.layers, "layer_kib": args.layer_kib, "repeat": args.repeat,
        "warm_gets": args.warm_gets, "replicas": FLEET_SIZE,
    }
    store_table, fleet_table, has_errors = tables(results, params)
    print(store_table + "\n\n" + fleet_table)
    text = section(command, started, time.time() - started, load_before, others, params,
                   provenance if run is not None else "?", results, store_table, fleet_table, log_notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(text)
    if args.json is not None:
        raw = {case: {name: asdict(c) for name, c in cells.items()} for case, cells in results.items()}
        args.json.write_text(json.dumps({"command": command, "params": params, "results": raw}, indent=1))
    _log(f"appended to {args.out} in {time.time() - started:.0f}s")
    return 1 if has_errors else 0


def _measure(run: Run) -> None:
    """Every measurement, the two stores alternated per repetition (so a drift of the machine
    affects both alike), then one replica against the fleet."""
    for _ in range(run.repeat):
        _guarded(run, ("cold",), "direct", partial(_direct, run))
        _guarded(run, ("cold", "warm"), "filesystem", partial(_store, run, "filesystem"))
        _guarded(run, ("cold", "warm", "bucket"), "s3", partial(_store, run, "s3"))
    for case, measure in (("pulls", _pulls), ("concurrent", _concurrent)):
        for name, count in (("one", 1), ("fleet", FLEET_SIZE)):
            replicas = Replicas(run.workdir / name, run.upstream.url, run.mirror_src, count, run.haproxy)
            _guarded(run, (case,), name, partial(measure, run, name, replicas))


def _log_problems(workdir: Path) -> list[str]:
    """A note on the error and warning lines of every mirror's log, with a few distinct ones."""
    found = {log: _grep(log, MIRROR_LOG_PROBLEMS) for log in sorted(workdir.rglob("mirror.log"))}
    lines = [line for problems in found.values() for line in problems]
    # Without their timestamps, so repeats of one message count once among the examples.
    distinct = list(dict.fromkeys(_TIMESTAMP.sub("", line.strip())[:240] for line in lines))
    where = ", ".join(str(log.parent.relative_to(workdir)) for log, problems in found.items() if problems)
    note = f"error, warning and traceback lines in the mirrors' logs: {len(lines)}"
    return [note + (f" (in {where}): {' ⏎ '.join(distinct[:4])}" if distinct else "")]


def _guarded(run: Run, cases: tuple[str, ...], system: str, measure: Callable[[], None]) -> None:
    """Run one measurement; an error lands in the cells of `cases` for `system` and the run goes on."""
    try:
        measure()
    except Exception as exc:  # noqa: BLE001 - one broken system must not stop the run
        message = f"{type(exc).__name__}: {str(exc).strip()}"
        for case in cases:
            cell = run.cell(case, system)
            cell.error = message.splitlines()[0][:200]
            cell.notes.append(message[:1500])
        run.log(f"{'/'.join(cases)} {system}: ERROR {message[:300]}")


def _pid(system: System) -> int:
    pid = system.pid()
    if pid is None:
        raise RuntimeError(f"{system.name} is not running")
    return pid


def _per_gb(used: dict[str, float], nbytes: float) -> dict[str, float]:
    """CPU seconds per GB (10^9 bytes) of each group, and of all of them as `total`."""
    per = {f"cpu_{name}": seconds / (nbytes / GB) for name, seconds in used.items()}
    per["cpu_total"] = sum(used.values()) / (nbytes / GB)
    return per


def _add_all(cell: Cell, values: dict[str, float]) -> None:
    for key, value in values.items():
        cell.add(key, value)


# --- 1. filesystem store against S3 store, one mirror process ------------------------------------

def _direct(run: Run) -> None:
    """The reference: the blob straight from the upstream registry (cold for no cache: the origin)."""
    blob, direct = run.seeded.big, Direct(run.upstream)
    groups: cpu.Groups = {"upstream": [_pid(run.upstream)]}
    quiesce()
    before = cpu.snapshot(groups)
    resp = _get_checked(direct, _blob_path(blob.digest), blob.size)
    cell = run.cell("cold", "direct")
    cell.add("ttlb", resp.total)
    cell.add("ttfb", resp.ttfb * 1000)
    _add_all(cell, _per_gb(cpu.used(before, cpu.snapshot(groups)), blob.size))
    run.log(f"direct: {resp.total:.2f}s, first byte {resp.ttfb * 1000:.1f}ms")


def _store(run: Run, store: str) -> None:
    """Cold, warm and (S3) from-the-bucket GETs of the big blob with one store."""
    blob = run.seeded.big
    s3 = store == "s3"
    toml = run.s3_toml() if s3 else ""
    first = Mirror(run.workdir / f"{store}-a", run.upstream.url, run.mirror_src)
    first.storage_toml = toml
    first.start(fresh=True)
    try:
        groups: cpu.Groups = {"mirror": [_pid(first)], **(run.gateway_group() if s3 else {})}
        resp, stored, used, gets = _fetch(run, first, groups, blob)
        cell = run.cell("cold", store)
        cell.add("ttlb", resp.total)
        cell.add("ttfb", resp.ttfb * 1000)
        cell.add("stored", stored)
        cell.add("upstream_gets", gets)
        _add_all(cell, _per_gb(used, blob.size))
        published = metric_total(first, "mirror_bucket_bytes_total", 'direction="up"')
        if s3 and published != blob.size:
            raise RuntimeError(f"{published:.0f} bytes published to the bucket, expected {blob.size}")
        run.log(f"cold {store}: {resp.total:.2f}s, first byte {resp.ttfb * 1000:.1f}ms, stored after "
                f"{stored:.2f}s, {gets} upstream GETs")
        _warm(run, store, first, groups, blob)
    finally:
        first.stop()
    if not s3:
        return
    second = Mirror(run.workdir / f"{store}-b", run.upstream.url, run.mirror_src)
    second.storage_toml = toml
    second.start(fresh=True)
    try:
        groups = {"mirror": [_pid(second)], **run.gateway_group()}
        resp, stored, used, gets = _fetch(run, second, groups, blob)
        copied = metric_total(second, "mirror_bucket_bytes_total", 'direction="down"')
        if copied != blob.size:
            raise RuntimeError(f"{copied:.0f} bytes copied from the bucket, expected {blob.size}")
        cell = run.cell("bucket", store)
        cell.add("mbps", blob.size / resp.total / 1e6)
        cell.add("ttfb", resp.ttfb * 1000)
        cell.add("stored", stored)
        cell.add("upstream_gets", gets)
        _add_all(cell, _per_gb(used, blob.size))
        run.log(f"from the bucket: {blob.size / resp.total / 1e6:.0f} MB/s, first byte {resp.ttfb * 1000:.1f}ms, "
                f"{gets} upstream GETs")
    finally:
        second.stop()


def _fetch(run: Run, mirror: Mirror, groups: cpu.Groups,
           blob: BlobFile) -> tuple[Response, float, dict[str, float], int]:
    """A GET of `blob` that `mirror` lacks: the response, seconds from the request until the mirror
    has no fetch in flight (stored; with S3, also published), the CPU seconds each group used until
    then, and the upstream GETs of the blob."""
    quiesce()
    mark = run.upstream.mark()
    before = cpu.snapshot(groups)
    t0 = time.perf_counter()
    resp = _get_checked(mirror, _blob_path(blob.digest), blob.size)
    stored = wait_stored(mirror) - t0
    used = cpu.used(before, cpu.snapshot(groups))
    return resp, stored, used, run.upstream.gets_since(mark, blob.digest)


def _warm(run: Run, store: str, mirror: Mirror, groups: cpu.Groups, blob: BlobFile) -> None:
    quiesce()
    cell = run.cell("warm", store)
    before = cpu.snapshot(groups)
    for _ in range(run.warm_gets):
        resp = _get_checked(mirror, _blob_path(blob.digest), blob.size)
        cell.add("mbps", blob.size / resp.total / 1e6)
    _add_all(cell, _per_gb(cpu.used(before, cpu.snapshot(groups)), blob.size * run.warm_gets))
    run.log(f"warm {store}: {', '.join(f'{v:.0f}' for v in cell.values['mbps'][-run.warm_gets:])} MB/s")


# --- 2. one replica against a fleet behind haproxy, both with the S3 store ------------------------

def _pulls(run: Run, name: str, replicas: Replicas) -> None:
    """Concurrent pulls of the image after one pull filled the replicas (and the bucket)."""
    img = run.seeded.image
    cell = run.cell("pulls", name)
    cell.totals["ok"] = run.pulls
    try:
        replicas.start(run.s3_toml())
        warm = run_loadgen(pull_spec(img, replicas.host, replicas.port, 1, 1))
        if warm["ok"] != 1:
            raise RuntimeError(f"warming pull failed: {warm['errors']}")
        replicas.wait_stored()
        for rep in range(run.repeat):
            quiesce()
            groups = {**replicas.groups(), **run.gateway_group()}
            before = cpu.snapshot(groups)
            res = run_loadgen(pull_spec(img, replicas.host, replicas.port, run.pulls, 10))
            used = cpu.used(before, cpu.snapshot(groups))
            wall, nbytes = float(res["wall"]), float(res["bytes"])  # type: ignore[arg-type]
            cell.add("wall", wall)
            cell.add("mbps", nbytes / wall / 1e6)
            cell.add("ok", float(res["ok"]))  # type: ignore[arg-type]
            if res["p99"] is not None:
                cell.add("p99", float(res["p99"]))  # type: ignore[arg-type]
            _add_all(cell, _per_gb(used, nbytes))
            if res["error_count"]:
                cell.notes.append(f"{res['error_count']} of {run.pulls} pulls failed, e.g. {res['errors'][:2]}")  # type: ignore[index]
            run.log(f"pulls {name} {rep + 1}/{run.repeat}: {wall:.2f}s, {res['ok']}/{run.pulls} ok, "
                    f"CPU {sum(used.values()):.1f}s")
    finally:
        replicas.stop()


def _concurrent(run: Run, name: str, replicas: Replicas) -> None:
    """Concurrent GETs of one blob no replica (nor the bucket) holds, each repetition from empty."""
    blob = run.seeded.shared
    cell = run.cell("concurrent", name)
    cell.totals["verified"] = run.concurrency
    for rep in range(run.repeat):
        try:
            replicas.start(run.s3_toml())
            quiesce()
            groups = {**replicas.groups(), **run.gateway_group()}
            mark = run.upstream.mark()
            before = cpu.snapshot(groups)
            res = run_loadgen({"mode": "concurrent", "host": replicas.host, "port": replicas.port,
                               "path": _blob_path(blob.digest), "n": run.concurrency, "digest": blob.digest,
                               "size": blob.size})
            replicas.wait_stored()
            used = cpu.used(before, cpu.snapshot(groups))
            gets = run.upstream.gets_since(mark, blob.digest)
            cell.add("wall", float(res["wall"]))  # type: ignore[arg-type]
            cell.add("verified", float(res["ok"]))  # type: ignore[arg-type]
            cell.add("upstream_gets", gets)
            _add_all(cell, _per_gb(used, blob.size * run.concurrency))
            if res["error_count"]:
                cell.notes.append(f"{res['error_count']} of {run.concurrency} GETs failed, e.g. {res['errors'][:2]}")  # type: ignore[index]
            run.log(f"concurrent {name} {rep + 1}/{run.repeat}: {res['wall']:.2f}s, "
                    f"{res['ok']}/{run.concurrency} verified, {gets} upstream GETs, CPU {sum(used.values()):.1f}s")
        finally:
            replicas.stop()


if __name__ == "__main__":
    sys.exit(main())
