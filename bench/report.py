"""The table (one row per scenario × metric × system: median (min–max), ratios to the best peer
and to the physical limit, the mirror's targets) and RESULTS.md around it."""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.scenarios import Cell, Metric, Scenario
from bench.systems import _which, version_of

PEERS = ("distribution", "drayage")
REPO_ROOT = Path(__file__).resolve().parent.parent

Medians = dict[str, float]  # system → median of one metric


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _le(limit: float) -> Callable[[float | None], bool | None]:
    return lambda r: None if r is None else r <= limit


def _floor(medians: Medians, cell: Cell) -> float | None:
    """A cold fetch's floor: the slower of the direct upstream GET and hashing the blob (a verifying
    cache does both; the hash is timed in the same repetitions)."""
    direct, hashing = medians.get("direct"), cell.values.get("sha256")
    return None if direct is None or not hashing else max(direct, statistics.median(hashing))


# (scenario, metric) → (target text, check(mirror median, all medians, mirror cell) → met?)
Target = tuple[str, Callable[[float, Medians, Cell], bool | None]]
TARGETS: dict[tuple[str, str], Target] = {
    ("cold", "ttlb"): ("≤ 1.15× max(direct, sha256)", lambda v, m, c: _le(1.15)(_ratio(v, _floor(m, c)))),
    ("cold", "ttfb"): ("≤ 2× direct", lambda v, m, c: _le(2.0)(_ratio(v, m.get("direct")))),
    ("warm", "mbps"): ("≥ 0.9× nginx", lambda v, m, c: None if "nginx" not in m else v >= 0.9 * m["nginx"]),
    ("concurrent", "upstream_gets"): ("exactly 1", lambda v, m, c: max(c.values["upstream_gets"]) == 1),
    ("concurrent", "wall"): ("≤ 1.2× nginx", lambda v, m, c: _le(1.2)(_ratio(v, m.get("nginx")))),
    ("concurrent", "verified"): ("all", lambda v, m, c: min(c.values["verified"]) == c.totals["verified"]),
    ("manifest-tag", "rps"): ("≥ drayage", lambda v, m, c: None if "drayage" not in m else v >= m["drayage"]),
    ("manifest-tag", "p99"): ("< 10 ms", lambda v, m, c: v < 10),
    ("manifest-digest", "rps"): ("≥ drayage", lambda v, m, c: None if "drayage" not in m else v >= m["drayage"]),
    ("manifest-digest", "p99"): ("< 10 ms", lambda v, m, c: v < 10),
    ("startup", "startup"): ("< 2 s", lambda v, m, c: v < 2.0),
    ("startup", "plan"): ("< 1 s", lambda v, m, c: v < 1.0),
    ("startup", "replan"): ("< 1 s", lambda v, m, c: v < 1.0),
}
RSS_TARGET: Target = ("< 100 MiB per process",
                      lambda v, m, c: None if c.rss_proc_mib is None else c.rss_proc_mib < 100)


def format_values(metric: Metric, values: list[float], cell: Cell) -> str:
    """The median in `metric.fmt`, "/total" for counts of a total, and "(min–max)" when they differ."""
    median = metric.fmt.format(statistics.median(values))
    text = median
    if metric.of_total and metric.key in cell.totals:
        text += f"/{cell.totals[metric.key]}"
    lo, hi = min(values), max(values)
    if len(values) > 1 and (metric.fmt.format(lo) != median or metric.fmt.format(hi) != median):
        text += f" ({metric.fmt.format(lo)}–{metric.fmt.format(hi)})"
    return text


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def scenario_label(s: Scenario, params: dict[str, Any]) -> str:
    try:
        return _label(s, params)
    except KeyError:
        return s.title


def _label(s: Scenario, params: dict[str, Any]) -> str:
    return {
        "cold": f"cold {params['blob_mib']} MiB blob",
        "warm": f"warm {params['blob_mib']} MiB blob",
        "concurrent": f"{params['concurrency']} concurrent cold GETs of a {params['shared_mib']} MiB blob",
        "pulls": f"{params['pulls']} concurrent warm pulls, {params['layers']} × {params['layer_kib']} KiB layers",
        "manifest-tag": f"manifest by tag within TTL, wrk {params['wrk']}",
        "manifest-digest": f"manifest by digest, wrk {params['wrk']}",
        "startup": f"mirror start-up, {params['startup_objects']} cached objects",
    }.get(s.name, s.title)


def table(scenarios: list[Scenario], results: dict[str, dict[str, Cell]], params: dict[str, Any]) -> tuple[str, bool]:
    """The markdown table, and whether any cell holds an error (unavailable systems are not errors)."""
    rows = ["| scenario | metric | system | median (min–max) | × best peer | × limit | target (mirror) |",
            "|---|---|---|---|---|---|---|"]
    has_errors = False
    for s in scenarios:
        cells = results.get(s.name, {})
        label = scenario_label(s, params)
        for metric in s.metrics:
            systems = [n for n in s.systems if n in cells and (metric.systems is None or n in metric.systems)]
            medians = {n: statistics.median(cells[n].values[metric.key]) for n in systems
                       if cells[n].values.get(metric.key) and cells[n].error is None}
            peers = {n: v for n, v in medians.items() if n in PEERS}
            best = None
            if peers and metric.better in ("lower", "higher"):
                best = (min if metric.better == "lower" else max)(peers.values())
            limit = medians.get(s.limit) if s.limit and metric.better in ("lower", "higher") and metric.key != "rss" else None
            for name in systems:
                cell = cells[name]
                values = cell.values.get(metric.key)
                if cell.unavailable:
                    value, r_peer, r_limit, target = f"unavailable ({cell.unavailable})", "–", "–", ""
                elif cell.error and not (metric.key == "rss" and values):
                    has_errors = True
                    value, r_peer, r_limit, target = f"error: {cell.error}", "–", "–", ""
                    if name == "mirror" and (s.name, metric.key) in TARGETS:
                        target = f"{TARGETS[(s.name, metric.key)][0]}: not measured (error)"
                elif not values:
                    has_errors = True
                    value, r_peer, r_limit, target = "error: no value", "–", "–", ""
                else:
                    value = format_values(metric, values, cell)
                    med = statistics.median(values)
                    r_peer = _x(_ratio(med, best)) if metric.better in ("lower", "higher") else "–"
                    r_limit = _x(_ratio(med, limit))
                    target = _target(s.name, metric, med, medians, cell) if name == "mirror" else ""
                rows.append(f"| {_esc(label)} | {_esc(metric.label)} | {name} | {_esc(value)} | {r_peer} | "
                            f"{r_limit} | {_esc(target)} |")
    return "\n".join(rows), has_errors


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _target(scenario: str, metric: Metric, med: float, medians: Medians, cell: Cell) -> str:
    target = RSS_TARGET if metric.key == "rss" else TARGETS.get((scenario, metric.key))
    if target is None:
        return ""
    text, check = target
    try:
        met = check(med, medians, cell)
    except (KeyError, ValueError, TypeError):
        met = None
    verdict = {True: "met", False: "MISSED", None: "n/a"}[met]
    return f"{text}: {verdict}"


# --- RESULTS.md -------------------------------------------------------------------------------

def command_line(argv: list[str], module: str = "bench") -> str:
    """How to run `python -m module argv` again from the repository root."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(REPO_ROOT)) if python.is_relative_to(REPO_ROOT) else python.name
    except ValueError:
        shown = python.name
    if shown == "python3" or not shown:
        shown = "python"
    return " ".join([shown, "-m", module, *map(shlex.quote, argv)])


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "memory": mem, "kernel": platform.release()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, argv in (("docker-registry", ["docker-registry", "--version"]), ("nginx", ["nginx", "-v"]),
                       ("drayage", ["drayage", "--version"]), ("wrk", ["wrk", "-v"])):
        binary = _which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        out[name] = version_of([binary, *argv[1:]]) if binary else "not installed"
    try:
        import uvloop  # noqa: F401
        out["uvloop (importable)"] = uvloop.__version__
    except ImportError:
        pass
    try:
        import aiohttp
        out["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    return out


def _targets_summary(scenarios: list[Scenario], results: dict[str, dict[str, Cell]], tbl: str) -> list[str]:
    lines = []
    for row in tbl.splitlines()[2:]:
        parts = [p.strip() for p in row.strip("|").split(" | ")]
        if len(parts) >= 7 and parts[2] == "mirror" and parts[6]:
            value = parts[3] if not parts[3].startswith("error") else "error"
            lines.append(f"- {parts[0]} — {parts[1]}: {value} → {parts[6]}")
    return lines


def results_md(command: str, started: float, seconds: float, params: dict[str, Any], scenarios: list[Scenario],
               results: dict[str, dict[str, Cell]], tbl: str, unavailable: dict[str, str]) -> str:
    m = machine()
    v = versions()
    out = [
        "# Benchmark results: mirror vs direct upstream, nginx, distribution proxy, drayage",
        "",
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(started))} (run took {seconds / 60:.1f} min)",
        f"- **command**: `{command}` (from the repository root)",
        f"- **machine**: nproc {m['nproc']}, CPU {m['cpu']}, memory {m['memory']}, kernel {m['kernel']}",
        "- **versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **mirror under test**: {params.get('mirror', '?')}",
        "- **parameters**: " + ", ".join(f"{k}={val}" for k, val in params.items() if k != "mirror"),
        "",
        "All on loopback (127.0.0.1). Each figure is the median of the repetitions with the range (min–max).",
        "`× best peer` is the value divided by the better of distribution and drayage; `× limit` is the value",
        "divided by the physical limit's (nginx sendfile for warm reads, the direct upstream for cold ones).",
        "For times and latencies below 1× is better; for MB/s and requests/s above 1× is better.",
        "MB = 10^6 bytes. Peak RSS is the process tree's (nginx: master + workers), sampled every 20 ms and",
        "completed with VmHWM; the target is checked per process.",
        "",
        "## Table",
        "",
        tbl,
        "",
        "## Mirror against its targets",
        "",
        *(_targets_summary(scenarios, results, tbl) or ["- (mirror not measured)"]),
        "",
        "## Notes",
        "",
    ]
    for name, reason in unavailable.items():
        out.append(f"- **{name}** unavailable: {reason}")
    for s in scenarios:
        for name, cell in results.get(s.name, {}).items():
            for note in dict.fromkeys(cell.notes):
                out.append(f"- {s.name} / {name}: {_esc(note)[:1200]}")
            if cell.rss_proc_mib is not None and cell.rss_tree_mib is not None \
                    and cell.rss_tree_mib - cell.rss_proc_mib > 1:
                out.append(f"- {s.name} / {name}: peak RSS {cell.rss_tree_mib:.0f} MiB for the tree, "
                           f"{cell.rss_proc_mib:.0f} MiB for its largest process")
    out += [
        "",
        "## Method",
        "",
        "- Upstream: Debian `docker-registry` (no auth) seeded over the registry API with chunked PATCH uploads",
        "  from generated random files; the blobs live in `library/bench`, the image (schema2 manifest, config",
        "  and the layers, random bytes) in `library/benchimg:latest`. Upstream GETs are counted in its access",
        "  log (read up to a marker request), after waiting for 1 s without new upstream GETs (a cache may keep",
        "  fetching in the background after its client was served).",
        "- nginx: `sendfile on; tcp_nopush on; worker_processes auto`, serving the very files that were pushed",
        "  (symlinks under `/v2/<repo>/blobs/<digest>`).",
        "- distribution proxy: a second `docker-registry` with `proxy: remoteurl:` the upstream and its own",
        "  filesystem storage (and `blobdescriptor: inmemory`).",
        "- drayage: `drayage serve -c config.toml` with `listen`, `cache_dir` (must exist), `manifest_ttl_seconds",
        "  = 900` and `[upstreams.docker_io] registry = \"http://127.0.0.1:PORT\"`; requests without a registry",
        "  prefix (`/v2/library/…`) go to the `docker_io` upstream.",
        "- mirror: `python -m mirror serve --config mirror.toml` with `[upstreams.\"docker.io\"] url = …`,",
        "  default settings otherwise (`workers = \"auto\"`: a supervisor and one worker per usable CPU, up",
        "  to 8; the RSS target is checked for the largest of those processes).",
        "- Systems start with an empty cache for each scenario (cold and concurrent: for each repetition).",
        "  The direct upstream is never restarted.",
        "- Single GETs (cold, warm) use a lean blocking HTTP/1.1 client in the orchestrator (recv_into a 1 MiB",
        "  buffer, no hashing while timed; the warming GET is verified by sha256). Time to first byte is from",
        "  sending the request to the first response byte.",
        "- Concurrent GETs and pulls run in a separate client process (`bench/loadgen.py`): one thread per",
        "  client, blocking keep-alive connection, all released together by a barrier; every concurrent GET",
        "  body is hashed; each pull GETs the manifest by tag (digest checked) then the config and every layer",
        "  in order on one connection (sizes checked, every 10th pull hashes all its bodies).",
        "- Manifest hits: `wrk -t2` with the docker `Accept` header, after one GET that fills the cache.",
        "- Start-up: time from spawning `python -m mirror serve` until `/readyz` answers 200, with N small",
        "  content files + content and link rows written with the mirror's own schema (images: a manifest and",
        "  the 9 blobs it references, last used over a month; page cache warm after the first repetition),",
        "  and with an empty data directory for comparison (interpreter + imports). The eviction plan is the",
        "  mirror's `plan_images` in a fresh process over the same data, from reading the content rows to the",
        "  ordered images: the first pass after a start reads every manifest, the next knows them.",
        "- The client shares the machine's CPUs with the system under test; on 2 cores this compresses ratios",
        "  of CPU-heavy scenarios.",
        "",
    ]
    return "\n".join(out)
