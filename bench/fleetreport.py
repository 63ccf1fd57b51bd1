"""The tables of `python -m bench.fleet` (median (min–max) per system, and the ratio of the two
compared: S3/filesystem, fleet/one) and the section it appends to RESULTS.md."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.report import format_values, machine, versions
from bench.scenarios import Cell, Metric
from bench.systems import _which, version_of

Results = dict[str, dict[str, Cell]]  # case → system → cell

_CPU = "CPU s per GB served"


def _cpu(group: str, label: str) -> Metric:
    return Metric(f"cpu_{group}", f"{_CPU}, {label}", "lower", "{:.2f}")


CPU_TOTAL = _cpu("total", "total")
STORE_SYSTEMS = ("direct", "filesystem", "s3")
FLEET_SYSTEMS = ("one", "fleet")

# case → the metrics of its rows, in order
STORE_ROWS: dict[str, tuple[Metric, ...]] = {
    "cold": (
        Metric("ttlb", "last byte, s", "lower"),
        Metric("ttfb", "first byte, ms", "lower", "{:.1f}"),
        Metric("stored", "stored fleet-wide, s (filesystem: stored locally)", "lower"),
        Metric("upstream_gets", "upstream GETs of the blob", "exact", "{:.0f}"),
        _cpu("upstream", "upstream registry"), _cpu("mirror", "mirror"), _cpu("gateway", "S3 gateway"), CPU_TOTAL,
    ),
    "warm": (
        Metric("mbps", "throughput, MB/s", "higher", "{:.0f}"),
        _cpu("mirror", "mirror"), _cpu("gateway", "S3 gateway"), CPU_TOTAL,
    ),
    "bucket": (
        Metric("mbps", "throughput, MB/s", "higher", "{:.0f}"),
        Metric("ttfb", "first byte, ms", "lower", "{:.1f}"),
        Metric("stored", "stored locally, s", "lower"),
        Metric("upstream_gets", "upstream GETs of the blob (must be 0)", "exact", "{:.0f}"),
        _cpu("mirror", "mirror"), _cpu("gateway", "S3 gateway"), CPU_TOTAL,
    ),
}
FLEET_ROWS: dict[str, tuple[Metric, ...]] = {
    "pulls": (
        Metric("wall", "wall time, s", "lower"),
        Metric("mbps", "throughput, MB/s", "higher", "{:.0f}"),
        Metric("p99", "p99 pull time, s", "lower"),
        Metric("ok", "pulls complete", "exact", "{:.0f}", of_total=True),
        _cpu("mirrors", "mirrors"), _cpu("haproxy", "haproxy"), _cpu("gateway", "S3 gateway"), CPU_TOTAL,
    ),
    "concurrent": (
        Metric("wall", "wall time, s", "lower"),
        Metric("upstream_gets", "upstream GETs of the blob", "exact", "{:.0f}"),
        Metric("verified", "bodies verified (sha256)", "exact", "{:.0f}", of_total=True),
        _cpu("mirrors", "mirrors"), _cpu("haproxy", "haproxy"), _cpu("gateway", "S3 gateway"), CPU_TOTAL,
    ),
}


def _label(case: str, p: dict[str, Any]) -> str:
    return {
        "cold": f"cold {p['blob_mib']} MiB blob",
        "warm": f"warm {p['blob_mib']} MiB blob (local hit)",
        "bucket": f"{p['blob_mib']} MiB blob from the bucket (2nd replica, empty data dir)",
        "pulls": f"{p['pulls']} concurrent warm pulls, {p['layers']} × {p['layer_kib']} KiB layers",
        "concurrent": f"{p['concurrency']} concurrent cold GETs of a {p['shared_mib']} MiB blob",
    }[case]


def _median(cell: Cell | None, key: str) -> float | None:
    if cell is None or cell.error or not cell.values.get(key):
        return None
    return statistics.median(cell.values[key])


def _value(cell: Cell | None, metric: Metric) -> tuple[str, bool]:
    """The cell's text for `metric`, and whether it is an error."""
    if cell is None:
        return "–", False
    if cell.error:
        return f"error: {cell.error}", True
    values = cell.values.get(metric.key)
    return (format_values(metric, values, cell), False) if values else ("–", False)


def _table(rows: dict[str, tuple[Metric, ...]], systems: tuple[str, ...], base: str, other: str,
           results: Results, params: dict[str, Any]) -> tuple[str, bool]:
    header = ["case", "metric", *systems, f"{other} / {base}"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    errors = False
    for case, metrics in rows.items():
        cells = results.get(case, {})
        for metric in metrics:
            if not any(cells.get(s) and (cells[s].values.get(metric.key) or cells[s].error) for s in systems):
                continue  # a figure no system has here (haproxy's CPU for one replica, …)
            texts = []
            for system in systems:
                text, failed = _value(cells.get(system), metric)
                errors |= failed
                texts.append(text.replace("|", "\\|"))
            a, b = _median(cells.get(base), metric.key), _median(cells.get(other), metric.key)
            ratio = f"{b / a:.2f}×" if metric.better != "exact" and a and b is not None else "–"
            out.append(f"| {_label(case, params)} | {metric.label} | {' | '.join(texts)} | {ratio} |")
    return "\n".join(out), errors


def tables(results: Results, params: dict[str, Any]) -> tuple[str, str, bool]:
    """The store table (direct, filesystem, s3, s3/filesystem), the fleet table (one, fleet,
    fleet/one), and whether any cell holds an error."""
    store, e1 = _table(STORE_ROWS, STORE_SYSTEMS, "filesystem", "s3", results, params)
    fleet, e2 = _table(FLEET_ROWS, FLEET_SYSTEMS, "one", "fleet", results, params)
    return store, fleet, e1 or e2


def _fig(results: Results, case: str, system: str, key: str, fmt: str = "{:.2f}") -> str:
    value = _median(results.get(case, {}).get(system), key)
    return "?" if value is None else fmt.format(value)


def _real_hosts(r: Results, p: dict[str, Any]) -> list[str]:
    """What the figures predict for real hosts, with this run's medians."""
    def f(case: str, system: str, key: str, fmt: str = "{:.2f}") -> str:
        return _fig(r, case, system, key, fmt)

    def per_core(case: str, system: str, key: str) -> str:
        """GB/s one core sustains at the median CPU s/GB."""
        value = _median(r.get(case, {}).get(system), key)
        return f"{1 / value:.1f}" if value else "?"

    return [
        "### What would change on real hosts",
        "",
        f"Here every process shares {machine()['nproc']} CPUs and one disk: the {p['replicas']} replicas, haproxy, the "
        "S3 gateway, the upstream and the load generator. A fleet cannot be faster on one machine: it adds "
        "haproxy's hop and more processes competing for the same cores, so fleet/one above is the overhead "
        "of the fleet, not its capacity. On real hosts each replica has its own CPUs, disks and NIC, and "
        "haproxy spreads digests over them, so capacity for hits grows with the replicas while a cold digest "
        "is still fetched once fleet-wide (one owner; the others copy it from the bucket).",
        "",
        "The CPU figures predict what each part needs per GB served, wherever it runs (the inverse is GB/s "
        f"per core). Warm hits are sendfile from local disk: {f('warm', 's3', 'cpu_mirror')} CPU s/GB with the S3 "
        f"store, {f('warm', 'filesystem', 'cpu_mirror')} with the filesystem store (the store does not change the "
        f"hit path), about {per_core('warm', 's3', 'cpu_mirror')} GB/s of large blobs per core, so a replica's "
        "NIC bounds its large hits long before its CPUs do (10 Gb/s is 1.25 GB/s). Pulls of small layers cost "
        f"more per GB ({f('pulls', 'one', 'cpu_mirrors')} s/GB, {per_core('pulls', 'one', 'cpu_mirrors')} GB/s "
        "per core: work per request). haproxy in HTTP mode copies every byte through user space: "
        f"{f('pulls', 'fleet', 'cpu_haproxy')} s/GB for the pulls and {f('concurrent', 'fleet', 'cpu_haproxy')} "
        f"s/GB for the large blob (the replicas behind it: {f('pulls', 'fleet', 'cpu_mirrors')} and "
        f"{f('concurrent', 'fleet', 'cpu_mirrors')}), about {per_core('pulls', 'fleet', 'cpu_haproxy')} GB/s of "
        "pulls per core; its host needs cores in proportion to the fleet's traffic, or it, not the replicas, "
        "caps the fleet. A cold fetch costs the mirror "
        f"{f('cold', 'filesystem', 'cpu_mirror')} CPU s/GB with the filesystem store and "
        f"{f('cold', 's3', 'cpu_mirror')} with the S3 store: the difference is the upload (reading the stored file "
        "back and sending it over HTTP), paid once per digest fleet-wide. Any other replica that needs the blob "
        f"pays {f('bucket', 's3', 'cpu_mirror')} CPU s/GB to copy it from the bucket (the same verifying pipeline "
        f"as an upstream fetch) instead of an upstream fetch. The gateway's share ({f('cold', 's3', 'cpu_gateway')} "
        f"s/GB receiving, {f('bucket', 's3', 'cpu_gateway')} s/GB sending) runs on S3's machines with a real "
        "bucket, not the replicas'.",
        "",
        f"S3 is remote on real hosts: a fill from the bucket runs at the replica's bandwidth to S3 "
        f"(here loopback: {f('bucket', 's3', 'mbps', '{:.0f}')} MB/s, first byte "
        f"{f('bucket', 's3', 'ttfb', '{:.1f}')} ms, against {f('cold', 'direct', 'ttfb', '{:.1f}')} ms for the "
        "upstream), after a HEAD to the bucket and one to upstream. Every cold miss asks the bucket first (a "
        f"HEAD): here the first byte of a cold GET went from {f('cold', 'filesystem', 'ttfb', '{:.1f}')} ms to "
        f"{f('cold', 's3', 'ttfb', '{:.1f}')} ms; on real hosts that is one round trip to S3 more. Publishing "
        f"(here {f('cold', 's3', 'stored')} s until stored fleet-wide against {f('cold', 's3', 'ttlb')} s to "
        "the client's last byte) runs after the client is served, at the replica's upload bandwidth with 2 "
        "parts of 16 MiB in flight; until it ends, a replica that is asked for the blob (after a failover: "
        "haproxy sends a digest to its owner) fetches it from upstream again. Uploads and fills are billed as "
        "requests (one PUT per 16 MiB part, a HEAD and a GET per fill) and, across regions or clouds, as "
        "egress; hits cost neither.",
        "",
    ]


def section(command: str, started: float, seconds: float, load: tuple[float, float, float], others: float,
            params: dict[str, Any], provenance: str, results: Results, store_table: str, fleet_table: str,
            log_notes: list[str]) -> str:
    """The RESULTS.md section of one run (appended after the existing ones); `load` is the load
    average when it began, `others` the CPU seconds the machine spent on other work during it."""
    m = machine()
    v = versions()
    juicefs = _which("juicefs")
    haproxy = _which("haproxy") or _which("/usr/sbin/haproxy")
    v["juicefs"] = version_of([juicefs, "version"]) if juicefs else "not installed"
    v["haproxy"] = version_of([haproxy, "-v"]) if haproxy else "not installed"
    notes = [f"- {case} / {system}: {note[:1200]}" for case, cells in results.items()
             for system, cell in cells.items() for note in dict.fromkeys(cell.notes)]
    notes += [f"- {note[:1200]}" for note in log_notes]
    return "\n".join([
        "",
        "## S3 store and fleet (`bench.fleet`): S3 against filesystem store, three replicas against one",
        "",
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(started))} (run took {seconds / 60:.1f} min)",
        f"- **command**: `{command}` (from the repository root)",
        f"- **machine**: nproc {m['nproc']}, CPU {m['cpu']}, memory {m['memory']}, kernel {m['kernel']}",
        f"- **other work**: load average {'/'.join(f'{x:.2f}' for x in load)} (1/5/15 min) at the start; during the "
        f"run other processes used {others:.1f} CPU s, {others / seconds / (os.cpu_count() or 1) * 100:.0f}% of the "
        "machine (its busy time from /proc/stat less this run's processes')",
        "- **versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("nginx", "drayage", "wrk")),
        f"- **mirror under test**: {provenance}",
        "- **parameters**: " + ", ".join(f"{k}={val}" for k, val in params.items()),
        "",
        "All on loopback; the S3 store is JuiceFS's S3 gateway (MinIO's code) over local files. Each figure is",
        "the median of the repetitions (min–max). CPU is user + system seconds of each process tree (from",
        "/proc, before and after), per GB (10^9 bytes) the clients received; the load generator's is not counted.",
        "\"Stored fleet-wide\" is from the request until the mirror's `mirror_inflight_fetches` and",
        "`mirror_bucket_uploads` are 0: stored locally and, with the S3 store, published to the bucket. MB = 10^6 bytes.",
        "",
        "### One mirror process: filesystem store against S3 store (direct upstream as the reference)",
        "",
        store_table,
        "",
        f"### One S3 replica against {params['replicas']} behind haproxy (deploy/fleet/haproxy.cfg)",
        "",
        fleet_table,
        "",
        *(["### Notes", "", *notes, ""] if notes else []),
        "### Method",
        "",
        "- Upstream, seeding, the single-GET client and the load generator are `python -m bench`'s (see Method",
        "  above). Mirrors run with default settings (`workers = \"auto\"`), the S3 store adds only `[storage]",
        "  backend = \"s3\"` and `[storage.s3]` for the gateway, under a fresh key prefix (an empty bucket) for",
        "  each cold measurement.",
        "- Cold, warm, from the bucket: per repetition, a mirror with an empty data directory GETs the blob",
        "  (cold), then GETs it again `warm_gets` times (warm); with S3, a second mirror with an empty data",
        "  directory and the same prefix then GETs it (from the bucket). Upstream GETs are counted in the",
        "  upstream's access log; the bytes published to and copied from the bucket are checked against",
        "  `mirror_bucket_bytes` (one full copy each way).",
        "- Pulls: the replicas start empty, one pull fills them (and the bucket), then `pulls` concurrent pulls",
        "  per repetition (manifest by tag, then config and layers; every 10th pull hashes its bodies).",
        "- Concurrent cold GETs: per repetition, every replica starts empty on a fresh prefix; CPU is counted",
        "  until no replica has a fetch in flight (the upload included).",
        "- The fleet is three `python -m mirror serve` processes and haproxy with deploy/fleet/haproxy.cfg as",
        "  shipped, only its `bind` and `server` addresses rewritten.",
        "",
        *_real_hosts(results, params),
    ])
