"""The systems under test, each started on a free loopback port and stopped by the caller.

- `UpstreamRegistry`: Debian's docker-registry without auth, seeded once; its access log (on
  stdout) lets the bench count upstream GETs. As a system under test it is "direct".
- `Nginx`: serves the same files (blob, layers, manifest) at the registry's paths, sendfile on.
- `DistributionProxy`: a second docker-registry with `proxy: remoteurl:` the upstream.
- `Drayage`: `drayage serve -c CONFIG` (PyPI wheel with a Rust binary); upstream docker.io → ours.
- `Mirror`: `python -m mirror serve --config FILE`, docker.io → ours.

`start(fresh=True)` begins with an empty cache directory; it returns seconds until ready.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import httpclient
from bench.procs import Managed, free_port, wait_until
from bench.seed import BLOB_REPO, Seeded

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')
_SYNC_PATH = "/v2/?bench-sync="


class Unavailable(Exception):
    """This system cannot run here (binary missing or broken); the report says why."""


def _which(name: str) -> str | None:
    """PATH first, then next to this interpreter (a venv's bin/ need not be on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() and os.access(beside, os.X_OK) else None


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else f"exit {out.returncode}"


class StartFailed(RuntimeError):
    """A system did not become ready; `detail` holds the end of its log."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class System:
    name = "?"
    owned = True  # started for the measurement (its VmHWM is meaningful)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: Managed | None = None
        self.starts = 0

    @property
    def host(self) -> str:
        return HOST

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.alive() else None

    def start(self, fresh: bool = True) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def _wait_ready(self, path: str, ok: tuple[int, ...] = (200,), timeout: float = 60.0) -> float:
        assert self.proc is not None
        proc = self.proc
        ready = wait_until(lambda: httpclient.status(HOST, self.port, path, timeout=1) in ok, timeout,
                           interval=0.01, alive=proc.alive)
        elapsed = time.monotonic() - proc.started_at
        if not ready:
            code = proc.popen.poll()
            lines = [line for line in proc.log_tail(60).splitlines() if line.strip()]
            self.stop()
            how = f"exited with status {code}" if code is not None else f"not ready after {elapsed:.1f}s"
            last = lines[-1].strip() if lines else "(empty log)"
            raise StartFailed(f"{self.name} {how} (GET {path}): {last}", "\n".join(lines[-15:]))
        return elapsed

    def log_problems(self) -> list[str]:
        """Lines of this system's logs that report errors (for the notes)."""
        return []


# --- the seeded upstream and "direct" ----------------------------------------------------

class UpstreamRegistry(System):
    name = "upstream"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.access_log = workdir / "access.log"
        self.config = workdir / "config.yml"
        storage = workdir / "storage"
        storage.mkdir(exist_ok=True)
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}},
            "http": {"addr": f"{HOST}:{self.port}", "secret": secrets.token_hex(16)},
        }
        self.config.write_text(json.dumps(config, indent=2))  # YAML ⊇ JSON

    def start(self, fresh: bool = True) -> float:
        # docker-registry writes the access log on stdout, everything else on stderr; both go
        # to one file here, which the access-line regex picks out.
        self.proc = Managed("upstream", [self.binary, "serve", str(self.config)], self.access_log)
        return self._wait_ready("/v2/")

    def mark(self) -> int:
        """A position in the access log; `gets_since` counts requests logged after it."""
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def _entries_since(self, mark: int) -> list[tuple[str, str, int]]:
        with self.access_log.open("rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return [(m["method"], m["path"], int(m["status"])) for m in _ACCESS_LINE.finditer(text)]

    def requests_since(self, mark: int) -> list[tuple[str, str, int]]:
        """Requests answered since `mark`, exact up to now: a marker request is sent and the
        log read up to it (distribution logs a line just after sending the response)."""
        marker = f"{_SYNC_PATH}{secrets.token_hex(8)}"
        httpclient.status(HOST, self.port, marker, timeout=5)
        entries: list[tuple[str, str, int]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            entries = self._entries_since(mark)
            if any(p == marker for _m, p, _s in entries):
                break
            time.sleep(0.01)
        return [e for e in entries if not e[1].startswith(_SYNC_PATH)]

    def gets_since(self, mark: int, digest: str) -> int:
        return sum(1 for m, p, _s in self.requests_since(mark) if m == "GET" and p.endswith(f"/blobs/{digest}"))

    def settle(self, mark: int, digest: str, quiet: float = 1.0, timeout: float = 120.0) -> int:
        """Wait until no new upstream GET of `digest` has been logged for `quiet` seconds (a cache
        may keep fetching in the background after its client is served); return the count."""
        deadline = time.monotonic() + timeout
        count, since = self.gets_since(mark, digest), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.gets_since(mark, digest)
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return count


class Direct(System):
    """The upstream itself, as a system under test (started and stopped by the bench, not here)."""

    name = "direct"
    owned = False  # its high-water mark includes the seeding: RSS is sampled instead

    def __init__(self, upstream: UpstreamRegistry) -> None:
        self.upstream = upstream
        self.workdir = upstream.workdir
        self.port = upstream.port
        self.proc = None
        self.starts = 0

    def pid(self) -> int | None:
        return self.upstream.pid()

    def start(self, fresh: bool = True) -> float:
        if self.upstream.pid() is None:
            raise RuntimeError("the upstream registry is not running")
        return 0.0

    def stop(self) -> None:
        pass


# --- nginx -----------------------------------------------------------------------------------

class Nginx(System):
    name = "nginx"

    def __init__(self, workdir: Path, binary: str, seeded: Seeded) -> None:
        super().__init__(workdir)
        self.binary = binary
        root = workdir / "root"
        files = [(BLOB_REPO, seeded.big), (BLOB_REPO, seeded.shared)]
        files += [(seeded.image.repo, b) for b in seeded.image.blobs]
        for repo, blob in files:
            link = root / "v2" / repo / "blobs" / blob.digest
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(blob.path)
        manifests = root / "v2" / seeded.image.repo / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        for ref in (seeded.image.tag, seeded.image.digest):
            (manifests / ref).write_bytes(seeded.image.manifest)
        self.root = root
        self.ready_path = f"/v2/{seeded.image.repo}/manifests/{seeded.image.tag}"

    def _config(self) -> Path:
        d = self.workdir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "temp" / sub).mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        # `user root`: the bench may run as root in a 0700 temp dir the default worker user
        # (nobody / www-data) could not read.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(user + f"""daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/temp/body;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    server {{
        listen {HOST}:{self.port};
        root {self.root};
        location ~ /manifests/ {{
            default_type application/vnd.docker.distribution.manifest.v2+json;
        }}
    }}
}}
""")
        return conf

    def start(self, fresh: bool = True) -> float:
        self.port = free_port()
        conf = self._config()
        self.proc = Managed("nginx", [self.binary, "-p", str(self.workdir), "-c", str(conf), "-e",
                                      str(self.workdir / "error.log")], self.workdir / "nginx.out")
        self.starts += 1
        return self._wait_ready(self.ready_path)

    def log_problems(self) -> list[str]:
        return _grep(self.workdir / "error.log", ("[error]", "[crit]", "[alert]", "[emerg]"))


# --- distribution in proxy mode ---------------------------------------------------------------

class DistributionProxy(System):
    name = "distribution"

    def __init__(self, workdir: Path, binary: str, upstream_url: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.upstream_url = upstream_url
        self.log = workdir / "registry.log"

    def start(self, fresh: bool = True) -> float:
        storage = self.workdir / "storage"
        if fresh and storage.exists():
            shutil.rmtree(storage)
        storage.mkdir(exist_ok=True)
        self.port = free_port()
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": f"{HOST}:{self.port}", "secret": secrets.token_hex(16)},
            "proxy": {"remoteurl": self.upstream_url},
        }
        path = self.workdir / "config.yml"
        path.write_text(json.dumps(config, indent=2))
        self.proc = Managed("distribution", [self.binary, "serve", str(path)], self.log)
        self.starts += 1
        return self._wait_ready("/v2/")

    def log_problems(self) -> list[str]:
        return _grep(self.log, ("level=error", "level=fatal", "panic:"))


# --- drayage ----------------------------------------------------------------------------------

class Drayage(System):
    name = "drayage"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir)
        binary = _which("drayage")
        if binary is None:
            raise Unavailable("drayage not found on PATH nor in the venv: pip install drayage")
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{binary} --version failed: {exc}") from None
        if out.returncode != 0:
            raise Unavailable(f"{binary} --version exited {out.returncode}: {out.stderr.strip()[:200]}")
        self.binary = binary
        self.version = out.stdout.strip()
        self.upstream_url = upstream_url
        self.log = workdir / "drayage.log"

    def start(self, fresh: bool = True) -> float:
        cache = self.workdir / "cache"
        if fresh and cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(exist_ok=True)  # drayage refuses a cache_dir that does not exist
        self.port = free_port()
        # `drayage init` writes this shape; requests without a registry prefix go to the
        # docker_io upstream (key: the hostname with '.' and '-' replaced by '_').
        config = self.workdir / "config.toml"
        config.write_text(
            f'listen = "{HOST}:{self.port}"\n'
            f'cache_dir = "{cache}"\n'
            "manifest_ttl_seconds = 900\n"
            "\n[upstreams.docker_io]\n"
            f'registry = "{self.upstream_url}"\n'
        )
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"}
        self.proc = Managed("drayage", [self.binary, "serve", "-c", str(config)], self.log, env=env)
        self.starts += 1
        return self._wait_ready("/v2/")

    def log_problems(self) -> list[str]:
        return _grep(self.log, (" ERROR ", "panicked"))


# --- the mirror -----------------------------------------------------------------------------

MIRROR_LOG_PROBLEMS = (" ERROR ", " CRITICAL ", "Traceback", " WARNING ")  # lines worth a note

class Mirror(System):
    name = "mirror"

    def __init__(self, workdir: Path, upstream_url: str, src: Path | None = None) -> None:
        super().__init__(workdir)
        self.upstream_url = upstream_url
        self.src = (src or REPO_ROOT).resolve()  # the directory holding the `mirror` package to run
        self.log = workdir / "mirror.log"
        self.data_dir = workdir / "data"
        self.storage_toml = ""  # `[storage]` tables appended to the config (default: the filesystem store)

    def write_config(self, data_dir: Path) -> Path:
        path = self.workdir / "mirror.toml"
        path.write_text(
            "[server]\n"
            f'listen = "{HOST}:{self.port}"\n'
            f'data_dir = "{data_dir}"\n'
            'shutdown_timeout = "5s"\n'
            '[upstreams."docker.io"]\n'
            f'url = "{self.upstream_url}"\n'
            + self.storage_toml
        )
        return path

    def start(self, fresh: bool = True, data_dir: Path | None = None, timeout: float = 60.0) -> float:
        data = data_dir or self.data_dir
        if fresh and data_dir is None and data.exists():
            shutil.rmtree(data)
        self.port = free_port()
        config = self.write_config(data)
        pythonpath = os.pathsep.join(filter(None, [str(self.src), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
        self.proc = Managed("mirror", [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                            self.log, env=env, cwd=self.src)
        self.starts += 1
        return self._wait_ready("/readyz", timeout=timeout)

    def log_problems(self) -> list[str]:
        return _grep(self.log, MIRROR_LOG_PROBLEMS)


# The last line of a Python traceback: "package.module.SomeError: message".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def _grep(path: Path, needles: tuple[str, ...], limit: int = 10_000) -> list[str]:
    """Lines with any of `needles`, and the exception lines that end tracebacks."""
    try:
        with path.open(errors="replace") as f:
            return [line.rstrip() for line in f
                    if any(n in line for n in needles) or _EXCEPTION_LINE.match(line)][:limit]
    except OSError:
        return []
