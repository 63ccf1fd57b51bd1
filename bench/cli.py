"""`python -m bench`: seed an upstream, run every scenario against every system, print the table
and write RESULTS.md (plus the raw figures next to it as JSON)."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench import report
from bench.procs import exit_on_sigterm, stop_all
from bench.scenarios import ALL_SYSTEMS, BY_NAME, SCENARIOS, Cell, run_cell
from bench.seed import Seeded, seed
from bench.systems import (
    _EXCEPTION_LINE, Direct, DistributionProxy, Drayage, Mirror, Nginx, System, Unavailable, UpstreamRegistry, _which,
)

MiB = 1024 * 1024
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Bench:
    """What every scenario needs: parameters, the seeded upstream, a log function."""

    workdir: Path
    upstream: UpstreamRegistry
    seeded: Seeded
    repeat: int
    concurrency: int
    pulls: int
    wrk_threads: int
    wrk_connections: int
    wrk_seconds: int
    startup_objects: int
    log: Callable[[str], None]
    mirror_src: Path | None = None
    mirror_provenance: str = ""
    systems: dict[str, System] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--blob-mib", type=int, default=512, help="size of the cold/warm blob (default 512)")
    p.add_argument("--shared-mib", type=int, default=128,
                   help="size of the blob of the concurrent-GETs scenario (default 128)")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent GETs of one cold blob (default 50)")
    p.add_argument("--pulls", type=int, default=200, help="concurrent warm pulls of the image (default 200)")
    p.add_argument("--layers", type=int, default=20, help="layers of the pulled image (default 20)")
    p.add_argument("--layer-kib", type=int, default=1024, help="size of each layer (default 1024 KiB)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    p.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run (default 10)")
    p.add_argument("--wrk-connections", type=int, default=100, help="wrk connections (default 100)")
    p.add_argument("--startup-objects", type=int, default=100_000,
                   help="cached objects for the start-up scenario (default 100000)")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(BY_NAME)}")
    p.add_argument("--systems", help=f"comma-separated systems: {','.join(ALL_SYSTEMS)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1 repetition, 1 s wrk runs, 1000 cached objects (smoke test)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    p.add_argument("--mirror-src", type=Path,
                   help="directory holding the `mirror` package to benchmark (default: this checkout)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches) for inspection")
    return p


def _names(value: str | None, known: tuple[str, ...], what: str) -> list[str]:
    if not value:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.blob_mib, args.shared_mib, args.layer_kib = 4, 2, 16
        args.pulls, args.repeat, args.wrk_seconds, args.startup_objects = 20, 1, 1, 1000
    scenarios = [BY_NAME[n] for n in _names(args.only, tuple(BY_NAME), "scenario")]
    scenarios.sort(key=SCENARIOS.index)
    wanted = _names(args.systems, ALL_SYSTEMS, "system")
    registry = _which("docker-registry")
    if registry is None:
        print("bench: docker-registry not found (apt-get install docker-registry): it is the upstream", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    command = report.command_line(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    started = time.time()
    _log(f"work directory {workdir}")
    results: dict[str, dict[str, Cell]] = {}
    bench: Bench | None = None
    try:
        upstream = UpstreamRegistry(workdir / "upstream", registry)
        upstream.start()
        t0 = time.monotonic()
        seeded = seed(upstream.host, upstream.port, workdir / "files", args.blob_mib * MiB, args.shared_mib * MiB,
                      args.layers, args.layer_kib * 1024)
        _log(f"seeded upstream {upstream.url} in {time.monotonic() - t0:.1f}s: {args.blob_mib} MiB blob "
             f"{seeded.big.digest[:19]}…, {args.shared_mib} MiB blob, {args.layers}-layer image")
        mirror_src, provenance = mirror_source(args.mirror_src, workdir)
        _log(f"mirror under test: {provenance}")
        bench = Bench(workdir, upstream, seeded, args.repeat, args.concurrency, args.pulls, 2,
                      args.wrk_connections, args.wrk_seconds, args.startup_objects, _log,
                      mirror_src=mirror_src, mirror_provenance=provenance)
        _make_systems(bench, wanted)
        for scenario in scenarios:
            results[scenario.name] = {}
            missing = [b for b in scenario.needs if _which(b) is None]
            for name in (s for s in scenario.systems if s in wanted):
                cell = Cell()
                if name in bench.unavailable:
                    cell.unavailable = bench.unavailable[name]
                elif missing:
                    cell.unavailable = f"{', '.join(missing)} not found"
                else:
                    _log(f"--- {scenario.name}: {name}")
                    cell = run_cell(bench, scenario, bench.systems[name])
                    cell.notes.extend(_log_problems(bench.systems[name]))
                results[scenario.name][name] = cell
        upstream.stop()
    finally:
        stop_all()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    params: dict[str, object] = {
        "blob_mib": args.blob_mib, "shared_mib": args.shared_mib, "concurrency": args.concurrency,
        "pulls": args.pulls, "layers": args.layers, "layer_kib": args.layer_kib, "repeat": args.repeat,
        "wrk": f"-t2 -c{args.wrk_connections} -d{args.wrk_seconds}s --latency",
        "startup_objects": args.startup_objects,
    }
    if bench is not None:
        params["mirror"] = bench.mirror_provenance
    table, has_errors = report.table(scenarios, results, params)
    print(table)
    text = report.results_md(command, started, time.time() - started, params, scenarios, results, table,
                             bench.unavailable if bench else {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {s: {n: asdict(c) for n, c in cells.items()} for s, cells in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "params": params, "results": raw},
                                                         indent=1))
    _log(f"wrote {args.out} in {time.time() - started:.0f}s")
    return 1 if has_errors else 0


def mirror_source(given: Path | None, workdir: Path) -> tuple[Path, str]:
    """The `mirror` package to run, and where it came from. By default a snapshot of this
    checkout's `mirror/` taken now, so edits made while the bench runs do not mix versions."""
    if given is not None:
        return given.resolve(), f"{given.resolve()} (tree {_tree_hash(given.resolve() / 'mirror')})"
    root = Path(__file__).resolve().parent.parent
    snapshot = workdir / "mirror-src"
    shutil.copytree(root / "mirror", snapshot / "mirror", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    rev, dirty = "?", "?"
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "?"
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "mirror"],
                                capture_output=True, text=True, timeout=10).stdout
        dirty = str(len(status.splitlines()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return snapshot, (f"this checkout's mirror/ at commit {rev} with {dirty} uncommitted changed files "
                      f"(snapshot tree {_tree_hash(snapshot / 'mirror')})")


def _tree_hash(directory: Path) -> str:
    """A short hash of every file's path and bytes, to tell apart the code a run measured."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _make_systems(b: Bench, wanted: list[str]) -> None:
    up = b.upstream
    makers: dict[str, Callable[[], System]] = {
        "direct": lambda: Direct(up),
        "nginx": lambda: _nginx(b),
        "distribution": lambda: DistributionProxy(b.workdir / "distribution", up.binary, up.url),
        "drayage": lambda: Drayage(b.workdir / "drayage", up.url),
        "mirror": lambda: Mirror(b.workdir / "mirror", up.url, b.mirror_src),
    }
    for name in wanted:
        try:
            b.systems[name] = makers[name]()
        except Unavailable as exc:
            b.unavailable[name] = str(exc)
            _log(f"{name} unavailable: {exc}")


def _nginx(b: Bench) -> System:
    binary = _which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        raise Unavailable("nginx not found (apt-get install nginx)")
    return Nginx(b.workdir / "nginx", binary, b.seeded)


def _log_problems(system: System) -> list[str]:
    """New error lines in the system's logs since the last look (each scenario reports its own)."""
    lines = system.log_problems()
    seen = getattr(system, "_problems_seen", 0)
    system._problems_seen = len(lines)  # type: ignore[attr-defined]
    new = lines[seen:]
    if not new:
        return []
    distinct = list(dict.fromkeys(_shorten(line.strip()) for line in new))
    # Exceptions first (they say what went wrong), most frequent first; then other lines.
    exceptions = Counter(line.strip()[:200] for line in new if _EXCEPTION_LINE.match(line))
    top = [f"{n}× {text}" for text, n in exceptions.most_common(3)]
    sample = " ⏎ ".join(top + [d for d in distinct if not _EXCEPTION_LINE.match(d)][: max(0, 3 - len(top))])
    return [f"{len(new)} error/warning lines in the {system.name} log ({len(distinct)} distinct), e.g. {sample}"]


def _shorten(line: str, keep: int = 260) -> str:
    return line if len(line) <= keep else f"{line[: keep // 2]} … {line[-keep // 2:]}"
