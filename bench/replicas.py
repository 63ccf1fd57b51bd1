"""Mirror replicas sharing one S3 bucket, alone or as a fleet behind haproxy.

- `Haproxy`: haproxy with deploy/fleet/haproxy.cfg as shipped, only its `bind` and `server`
  addresses rewritten (as tests/integration/test_fleet.py runs it).
- `Replicas`: N `Mirror`s with the same `[storage]` tables (one bucket, one prefix), behind a
  `Haproxy` when N > 1. Clients talk to `host:port`; `groups()` names the processes whose CPU
  the bench counts.
- `metric_total` / `wait_stored`: a mirror's `/metrics`, to tell when what it fetched is stored
  (and, with the S3 store, published to the bucket).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from bench import httpclient
from bench.cpu import Groups
from bench.procs import Managed, free_port
from bench.systems import HOST, REPO_ROOT, Mirror, System

HAPROXY_CFG = REPO_ROOT / "deploy" / "fleet" / "haproxy.cfg"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)", re.MULTILINE)


def render_haproxy(config: str, listen: str, servers: dict[str, str]) -> str:
    """`config` with its one `bind` address replaced by `listen` and each `server NAME ADDRESS`
    pointed at `servers[NAME]`; ValueError if the file no longer has exactly those lines."""
    config, binds = re.subn(r"^(\s*bind )\S+", rf"\g<1>{listen}", config, flags=re.MULTILINE)
    named: list[str] = []

    def address(m: re.Match[str]) -> str:
        named.append(m[2])
        return f"{m[1]}{servers[m[2]]}"

    config = re.sub(r"^(\s*server (\S+) )\S+", address, config, flags=re.MULTILINE)
    if binds != 1 or sorted(named) != sorted(servers):
        raise ValueError(f"{HAPROXY_CFG}: {binds} bind lines, servers {named}, expected {sorted(servers)}")
    return config


class Haproxy(System):
    name = "haproxy"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.log = workdir / "haproxy.log"

    def start_for(self, servers: dict[str, str]) -> float:
        """Start in front of `servers` (config name → host:port); seconds until /readyz passes through."""
        self.port = free_port()
        config = self.workdir / "haproxy.cfg"
        config.write_text(render_haproxy(HAPROXY_CFG.read_text(), f"{HOST}:{self.port}", servers))
        self.proc = Managed("haproxy", [self.binary, "-f", str(config), "-db"], self.log)
        self.starts += 1
        return self._wait_ready("/readyz", timeout=20)


class Replicas:
    """`count` mirror replicas under `workdir`/mirrorN, all with `storage_toml`; behind haproxy when
    `count` > 1 (named mirror1… as in deploy/fleet/haproxy.cfg, which names three)."""

    def __init__(self, workdir: Path, upstream_url: str, src: Path, count: int, haproxy: str | None) -> None:
        if count > 1 and haproxy is None:
            raise ValueError("a fleet needs haproxy")
        self.mirrors = [Mirror(workdir / f"mirror{i}", upstream_url, src) for i in range(1, count + 1)]
        self.proxy = Haproxy(workdir / "haproxy", haproxy) if count > 1 and haproxy else None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self.proxy.port if self.proxy is not None else self.mirrors[0].port

    def start(self, storage_toml: str) -> None:
        """Every replica with an empty data directory and `storage_toml`, then haproxy."""
        for mirror in self.mirrors:
            mirror.storage_toml = storage_toml
        # One after the other, from this thread: a child started from a pool thread would get the
        # SIGTERM Managed asks for on its parent's death when that thread ends (PR_SET_PDEATHSIG).
        for mirror in self.mirrors:
            mirror.start(fresh=True)
        if self.proxy is not None:
            self.proxy.start_for({f"mirror{i}": f"{HOST}:{m.port}" for i, m in enumerate(self.mirrors, 1)})

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for mirror in self.mirrors:
            mirror.stop()

    def groups(self) -> Groups:
        """The processes to count: every replica (supervisor and workers), and haproxy if any."""
        groups: Groups = {"mirrors": [p for p in (m.pid() for m in self.mirrors) if p is not None]}
        if self.proxy is not None and (pid := self.proxy.pid()) is not None:
            groups["haproxy"] = [pid]
        return groups

    def wait_stored(self, timeout: float = 300.0) -> None:
        for mirror in self.mirrors:
            wait_stored(mirror, timeout)


def metric_total(system: System, name: str, labels: str = "") -> float:
    """The sum of the samples of `name` on `system`'s /metrics whose labels contain `labels`
    (e.g. 'direction="up"'); the workers' shares are already summed by the mirror."""
    resp = httpclient.get(system.host, system.port, "/metrics", keep_body=True, timeout=10)
    if resp.status != 200 or resp.body is None:
        raise RuntimeError(f"GET /metrics: status {resp.status}")
    return sum(float(m["value"]) for m in _SAMPLE.finditer(resp.body.decode())
               if m["name"] == name and labels in (m["labels"] or ""))


def wait_stored(mirror: System, timeout: float = 300.0) -> float:
    """Wait until `mirror` has no fetch in flight (`mirror_inflight_fetches` 0: stored locally)
    nor upload to the bucket (`mirror_bucket_uploads` 0); the time it was seen, perf_counter seconds."""
    deadline = time.monotonic() + timeout
    while metric_total(mirror, "mirror_inflight_fetches") + metric_total(mirror, "mirror_bucket_uploads") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mirror.name} on port {mirror.port}: fetches still in flight after {timeout:.0f}s")
        time.sleep(0.01)
    return time.perf_counter()
