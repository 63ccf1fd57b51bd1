"""`python -m bench.soak --minutes 3`: the mirror as a CI farm uses it, for minutes (issue 12).

A real mirror process (`python -m mirror serve`, its default worker count) with a size cap that
holds about half of 40 images (20 repositories, two tags each sharing a base layer), in front of
Debian's docker-registry through a fault proxy that refuses connections, answers 503 or hangs for
`--fault-seconds` every `--fault-every` seconds. 64 clients (`bench.soakload`, its own process) pull
images of mixed popularity the whole time, checking every answer. Every `--sample-every` seconds a
row: RSS and open descriptors of each mirror process, the data directory against the cap, and the
request outcomes so far. The table and the totals are printed and appended to bench/RESULTS.md.

Exit status 1 if a client saw what it never should (a wrong body, a 404, a 500, a failure of
cached content or outside a fault), or the mirror logged an ERROR or a traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import httpclient
from bench.procs import process_tree, stop_all
from bench.report import command_line
from bench.seed import DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, BlobFile, Pusher, write_random
from bench.systems import HOST, REPO_ROOT, Mirror, UpstreamRegistry, _grep, _which
from tests.fakes.fault_proxy import FaultProxy

MiB = 1 << 20
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
FAULTS = ("refuse", "503", "hang")
# Problems a client must never meet; anything else the load counts is a retryable answer to a fault.
PROBLEMS = ("corrupt body", "404 for content upstream has", "500 (never allowed)", "failure of cached content",
            "failure with no fault on", "client timeout", "failure that is not a retryable OCI error")


class CappedMirror(Mirror):
    """The bench's mirror with a size cap, a short tag TTL (tags expire all along) and, if given,
    a worker count."""

    def __init__(self, workdir: Path, upstream_url: str, cap: int, tag_ttl: str, workers: str | None,
                 src: Path | None) -> None:
        super().__init__(workdir, upstream_url, src)
        self.cap, self.tag_ttl, self.workers = cap, tag_ttl, workers

    def write_config(self, data_dir: Path) -> Path:
        path = self.workdir / "mirror.toml"
        workers = f'workers = "{self.workers}"\n' if self.workers else ""
        path.write_text(
            "[server]\n"
            f'listen = "{HOST}:{self.port}"\n'
            f'data_dir = "{data_dir}"\n'
            'shutdown_timeout = "5s"\n'
            f"{workers}"
            "[cache]\n"
            f'max_size = "{self.cap}B"\n'
            '[upstreams."docker.io"]\n'
            f'url = "{self.upstream_url}"\n'
            f'tag_ttl = "{self.tag_ttl}"\n'
        )
        return path


def seed_images(host: str, port: int, files: Path, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` images in count/2 repositories: tags 1 and 2 share a base layer of 1–4 MiB and add
    one to three layers of 256 KiB–2 MiB each (sizes seeded; bytes random)."""
    files.mkdir(parents=True, exist_ok=True)
    images = []
    for r in range(count // 2):
        repo = f"soak/app{r:02d}"
        base = write_random(files / f"app{r:02d}-base", rng.randrange(1 * MiB, 4 * MiB))
        with Pusher(host, port, repo) as pusher:
            pusher.push_blob(base)
            for tag in ("1", "2"):
                own = [write_random(files / f"app{r:02d}-{tag}-{i}", rng.randrange(MiB // 4, 2 * MiB))
                       for i in range(rng.randrange(1, 4))]
                layers = [base, *own]
                config_bytes = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
                    "type": "layers", "diff_ids": [b.digest for b in layers]}}).encode()
                config_path = files / f"app{r:02d}-{tag}-config"
                config_path.write_bytes(config_bytes)
                config = BlobFile(config_path, f"sha256:{hashlib.sha256(config_bytes).hexdigest()}", len(config_bytes))
                manifest = json.dumps({
                    "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                    "config": {"mediaType": DOCKER_CONFIG, "size": config.size, "digest": config.digest},
                    "layers": [{"mediaType": DOCKER_LAYER, "size": b.size, "digest": b.digest} for b in layers],
                }, indent=3).encode()
                for blob in (config, *own):
                    pusher.push_blob(blob)
                digest = pusher.put_manifest(tag, DOCKER_MANIFEST, manifest)
                manifest_path = files / f"app{r:02d}-{tag}-manifest"
                manifest_path.write_bytes(manifest)
                images.append({
                    "repo": repo, "tag": tag,
                    "manifest": {"digest": digest, "size": len(manifest), "path": str(manifest_path)},
                    "blobs": [{"digest": b.digest, "size": b.size, "path": str(b.path)} for b in (config, *layers)],
                })
    return images


def content_bytes(images: list[dict[str, Any]]) -> int:
    """What the cache holds once every image was pulled (shared layers once)."""
    sizes = {b["digest"]: b["size"] for im in images for b in (im["manifest"], *im["blobs"])}
    return sum(sizes.values())


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # evicted while we walked
    return total


def mirror_counts(host: str, port: int) -> dict[str, float]:
    """The mirror's own account from /metrics: requests by result (manifests and blobs), bytes
    served by source, bytes from upstream, bytes evicted."""
    resp = httpclient.get(host, port, "/metrics", keep_body=True, timeout=10)
    counts: dict[str, float] = {}
    for line in (resp.body or b"").decode().splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        if m["name"] == "mirror_requests_total" and labels.get("kind") in ("manifest", "blob"):
            key = f"result {labels.get('result')}"
        elif m["name"] == "mirror_bytes_served_total":
            key = f"served from {labels.get('source')}"
        elif m["name"] in ("mirror_upstream_bytes_total", "mirror_evicted_bytes_total"):
            key = m["name"]
        else:
            continue
        counts[key] = counts.get(key, 0.0) + float(m["value"])
    return counts


def _status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Row:
    at: float
    fault: str
    rss_mib: list[float]
    fds: list[int]
    content_mib: float
    tmp_mib: float
    counts: dict[str, int]


@dataclass
class DiskWatch:
    """Samples content/ and tmp/ every quarter second in a thread: the cap's worst moments."""

    data_dir: Path
    cap: int
    max_content: int = 0
    max_total: int = 0
    over_cap: int = 0  # samples with content/ above the cap
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.25):
            content, tmp = dir_bytes(self.data_dir / "content"), dir_bytes(self.data_dir / "tmp")
            self.samples += 1
            self.max_content = max(self.max_content, content)
            self.max_total = max(self.max_total, content + tmp)
            self.over_cap += content > self.cap

    def stop(self) -> None:
        self._stop.set()


class Schedule:
    """Faults switched on the proxy by the wall clock: FAULTS in turn, `length` s every `every` s."""

    def __init__(self, proxy: FaultProxy, start: float, until: float, every: float, length: float) -> None:
        self.proxy = proxy
        self.windows: list[tuple[str, float, float]] = []
        on = start + every / 2
        while on + length <= until:
            self.windows.append((FAULTS[len(self.windows) % len(FAULTS)], on, on + length))
            on += every
        self._stop = threading.Event()

    def current(self, now: float) -> str:
        return next((name for name, on, off in self.windows if on <= now < off), "-")

    def run(self) -> None:
        for name, on, off in self.windows:
            if self._stop.wait(max(0.0, on - time.time())):
                return
            self._switch(name, True)
            if self._stop.wait(max(0.0, off - time.time())):
                self._switch(name, False)
                return
            self._switch(name, False)

    def _switch(self, name: str, on: bool) -> None:
        if name == "refuse":
            self.proxy.refuse = on
        elif name == "503":
            self.proxy.status = 503 if on else None
        else:
            self.proxy.hang = on

    def stop(self) -> None:
        self._stop.set()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="how long the clients pull (default 3)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--images", type=int, default=40, help="images, two per repository (default 40)")
    p.add_argument("--cap-share", type=float, default=0.5, help="cap as a share of all content (default 0.5)")
    p.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (default 30)")
    p.add_argument("--fault-seconds", type=float, default=10.0, help="length of each fault (default 10)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between rows (default 5)")
    p.add_argument("--tag-ttl", default="20s", help="the mirror's tag TTL (default 20s)")
    p.add_argument("--workers", help="the mirror's worker processes (default: its own, auto)")
    p.add_argument("--seed", type=int, default=1234, help="seed of sizes and choices (default 1234)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file to append to (default {DEFAULT_OUT})")
    p.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    p.add_argument("--mirror-ref", help="run the mirror of this commit (exported with git archive) instead of "
                   "the checkout as it is")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, cache, seeded files)")
    return p


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60, check=True)


def export(ref: str, into: Path) -> tuple[Path, str]:
    """The tree of `ref` in `into` (git archive: nothing uncommitted), and its short hash."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into, _git("rev-parse", "--short", ref).stdout.strip()


def _commit() -> str:
    """The checkout's commit, and whether the mirror package differs from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "mirror"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (with uncommitted changes under mirror/)" if dirty else head


def _table(rows: list[Row], cap: int) -> list[str]:
    lines = ["| t, s | fault | RSS, MiB (per process) | open fds | content/ + tmp/, MiB (cap "
             f"{cap / MiB:.1f}) | pulls | requests | retryable errors | problems |",
             "|---:|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        c = row.counts
        retryable = sum(n for k, n in c.items() if k.startswith("retryable"))
        problems = sum(c.get(k, 0) for k in PROBLEMS)
        lines.append(f"| {row.at:.0f} | {row.fault} | {' / '.join(f'{m:.0f}' for m in row.rss_mib)} | "
                     f"{' / '.join(map(str, row.fds))} | {row.content_mib:.1f} + {row.tmp_mib:.1f} | "
                     f"{c.get('pulls', 0)} | {c.get('requests', 0)} | {retryable} | {problems} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    registry = _which("docker-registry")
    if registry is None:
        print("bench.soak: docker-registry not found (apt-get install docker-registry): it is the upstream",
              file=sys.stderr)
        return 2
    command = command_line(argv if argv is not None else sys.argv[1:]).replace(" -m bench", " -m bench.soak", 1)
    workdir = Path(tempfile.mkdtemp(prefix="mirror-soak-"))
    _log(f"work directory {workdir}")
    proxy: FaultProxy | None = None
    try:
        upstream = UpstreamRegistry(workdir / "upstream", registry)
        upstream.start()
        images = seed_images(upstream.host, upstream.port, workdir / "files", args.images, random.Random(args.seed))
        total = content_bytes(images)
        cap = int(total * args.cap_share)
        _log(f"seeded {len(images)} images, {total / MiB:.1f} MiB; cap {cap / MiB:.1f} MiB")
        proxy = FaultProxy(upstream.url)
        proxy.start()
        assert proxy.url is not None
        src, commit = export(args.mirror_ref, workdir / "src") if args.mirror_ref else (None, _commit())
        mirror = CappedMirror(workdir / "mirror", proxy.url, cap, args.tag_ttl, args.workers, src)
        mirror.start()
        pid = mirror.pid()
        assert pid is not None
        start = time.time()
        until = start + args.minutes * 60
        schedule = Schedule(proxy, start, until, args.fault_every, args.fault_seconds)
        spec = {"host": HOST, "port": mirror.port, "clients": args.clients, "seed": args.seed, "until": until,
                "timeout": 60.0, "grace": 5.0, "report_every": 1.0, "data_dir": str(mirror.data_dir),
                "images": images, "faults": schedule.windows}
        load = subprocess.Popen([sys.executable, "-m", "bench.soakload"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        assert load.stdin is not None and load.stdout is not None
        load.stdin.write(json.dumps(spec))
        load.stdin.close()
        latest: dict[str, Any] = {"counts": {}}

        def read_load() -> None:
            assert load.stdout is not None
            for line in load.stdout:
                latest.update(json.loads(line))

        disk = DiskWatch(mirror.data_dir, cap)
        threads = [threading.Thread(target=f, daemon=True) for f in (read_load, disk.run, schedule.run)]
        for t in threads:
            t.start()
        rows: list[Row] = []
        _log(f"{args.clients} clients for {args.minutes:g} min; faults {', '.join(n for n, _a, _b in schedule.windows)}")
        while load.poll() is None:
            time.sleep(args.sample_every)
            pids = process_tree(pid)
            row = Row(time.time() - start, schedule.current(time.time()),
                      [_status_kib(p, "VmRSS:") / 1024 for p in pids], [_fds(p) for p in pids],
                      dir_bytes(mirror.data_dir / "content") / MiB, dir_bytes(mirror.data_dir / "tmp") / MiB,
                      dict(latest["counts"]))
            rows.append(row)
            print(_table([row], cap)[-1], flush=True)
        threads[0].join(timeout=10)
        own = mirror_counts(HOST, mirror.port)
        disk.stop()
        schedule.stop()
        log_errors = _grep(mirror.log, (" ERROR ", " CRITICAL ", "Traceback"))
        lines = _report(args, command, commit, images, total, cap, rows, latest, disk, log_errors, own)
        print("\n".join(lines))
        if not args.no_write:
            with args.out.open("a") as out:
                out.write("\n" + "\n".join(lines) + "\n")
            _log(f"appended to {args.out}")
        problems = sum(latest["counts"].get(k, 0) for k in PROBLEMS)
        return 1 if problems or log_errors else 0
    finally:
        if proxy is not None:
            proxy.stop()
        stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(args: argparse.Namespace, command: str, commit: str, images: list[dict[str, Any]], total: int, cap: int,
            rows: list[Row], final: dict[str, Any], disk: DiskWatch, log_errors: list[str],
            own: dict[str, float]) -> list[str]:
    """The section for RESULTS.md: what ran, the table, the totals and the verdicts."""
    counts: dict[str, int] = final["counts"]
    statuses = ", ".join(f"{k.removeprefix('status ')}: {n}" for k, n in sorted(counts.items())
                         if k.startswith("status ") or k == "no answer")
    retryable = ", ".join(f"{k.removeprefix('retryable ')}: {n}" for k, n in sorted(counts.items())
                          if k.startswith("retryable"))
    first, last = rows[0] if rows else None, rows[-1] if rows else None
    lines = [
        f"## Soak (issue 12): {args.clients} clients, {len(images)} images, a cap of half, faults every "
        f"{args.fault_every:g} s",
        "",
        f"On {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, mirror at commit {commit}, "
        f"`{command}`: {len(images)} images ({total / MiB:.1f} MiB, shared base layers "
        f"counted once), cap {cap / MiB:.1f} MiB, tag TTL {args.tag_ttl}, the mirror's default workers"
        f"{'' if not args.workers else f' ({args.workers})'}; upstream faults (refuse, 503, hang) for "
        f"{args.fault_seconds:g} s every {args.fault_every:g} s; a row every {args.sample_every:g} s.",
        "",
        *_table(rows, cap),
        "",
        f"- Pulls {counts.get('pulls', 0)}, requests {counts.get('requests', 0)}; statuses {statuses}.",
        f"- Retryable failures during faults (429/502/503 with an OCI body, or a transfer cut short): "
        f"{retryable or 'none'}.",
        *(f"- **{k}**: {counts.get(k, 0)}" + (" — e.g. " + "; ".join(final.get("examples", {}).get(k, [])[:3])
                                             if counts.get(k, 0) else "") for k in PROBLEMS),
        "- Slowest answer for a cached tag, by fault on at the time: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(final.get("slowest_cached_tag", {}).items())) + ".",
        f"- Data directory (sampled every 0.25 s, {disk.samples} samples): content/ at most "
        f"{disk.max_content / MiB:.1f} MiB, content/ + tmp/ at most {disk.max_total / MiB:.1f} MiB, against a "
        f"cap of {cap / MiB:.1f} MiB; samples with content/ over the cap: {disk.over_cap}.",
    ]
    if first is not None and last is not None:
        lines.append(f"- RSS per process, first row → last: "
                     f"{' / '.join(f'{a:.0f}→{b:.0f}' for a, b in zip(first.rss_mib, last.rss_mib))} MiB "
                     f"(max {' / '.join(f'{max(r.rss_mib[i] for r in rows if i < len(r.rss_mib)):.0f}' for i in range(len(last.rss_mib)))}); "
                     f"open fds {' / '.join(f'{a}→{b}' for a, b in zip(first.fds, last.fds))} "
                     f"(max {' / '.join(str(max(r.fds[i] for r in rows if i < len(r.fds))) for i in range(len(last.fds)))}).")
    answered = sum(v for k, v in own.items() if k.startswith("result "))
    cached = sum(own.get(f"result {r}", 0.0) for r in ("hit", "coalesced", "stale"))
    lines.append(f"- The mirror's own counts: {cached / answered:.0%} of manifest and blob requests answered from the "
                 f"cache (hit, coalesced or stale) of {answered:.0f}; {own.get('served from cache', 0) / MiB:.0f} MiB "
                 f"sent from the cache, {own.get('served from upstream', 0) / MiB:.0f} MiB as it arrived; "
                 f"{own.get('mirror_upstream_bytes_total', 0) / MiB:.0f} MiB fetched from upstream, "
                 f"{own.get('mirror_evicted_bytes_total', 0) / MiB:.0f} MiB evicted."
                 if answered else "- The mirror's /metrics had no request counts.")
    lines.append(f"- ERROR or traceback lines in the mirror's log: {len(log_errors)}"
                 + (f", e.g. `{log_errors[0][:200]}`" if log_errors else "") + ".")
    return lines


if __name__ == "__main__":
    sys.exit(main())
