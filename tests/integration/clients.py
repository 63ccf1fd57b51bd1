"""Drivers that make the real clients pull through a registry mirror, configured the way users
configure them, for integration tests.

The mirror under test is a plain-HTTP server on 127.0.0.1:PORT that mirrors docker.io: a client
asked for `docker.io/library/foo:1` must end up requesting `/v2/library/foo/manifests/1` there.
Every driver has the same shape (`Client`): `pull(mirror_host, repo, ref, creds)` returns the
digest of the manifest the reference resolved to (for a multi-platform image, the index's own
digest), `remove_all()` wipes what was pulled so the next pull really fetches, and failures raise
`PullError` carrying the client's stderr (and, for dockerd, the daemon's log lines of that pull).
The podman, containerd and dockerd drivers write their own config for the mirror; given a
keyword (`registries_conf=`, `hosts_dir=`, `daemon_json=`) they pull with that config instead.

    client      how it reaches the mirror                                    pull, tiny image
    skopeo      `skopeo copy docker://HOST/REPO:REF dir:…`: the mirror by name        ~0.03 s
    podman      private registries.conf: a `[[registry.mirror]]` of docker.io         ~0.15 s
    containerd  own daemon; `ctr images pull --hosts-dir`, docker.io/hosts.toml       ~0.15 s
    dockerd     own daemon; daemon.json `registry-mirrors`, reloaded by SIGHUP       ~0.15 s

Start-up (measured here): containerd ~0.1 s, dockerd ~0.2 s with its containerd, stop ~0.1 s;
pointing dockerd at another mirror is a SIGHUP reload (~0.05 s), never a restart.

Isolation and gotchas (Debian 12: skopeo 1.9, podman 4.3, containerd 1.6, dockerd 20.10):
- No client can reach a real registry: each runs with HTTP(S)_PROXY pointing at a loopback proxy
  of ours that answers everything with `403 real registries are blocked in tests` (`BLOCKED`).
  Go never proxies loopback addresses, so the mirror is reached directly, while the fallback to
  docker.io that podman, containerd and dockerd make when the mirror fails is refused at once. So
  a pull succeeds only through the mirror, and a failing mirror fails fast, with or without a
  network. A refused connection would do too, but podman retries network errors (3 times, 1 s
  apart); a 403 it does not. dockerd reports only the fallback's error (`Get
  "https://registry-1.docker.io/v2/": real registries are blocked in tests`), so `PullError.log`
  holds the daemon's log of the mirror's failure; podman and ctr print both.
- Drivers block (subprocesses): from an async test whose mirror runs on the test's own event loop,
  call them through `await asyncio.to_thread(client.pull, ...)`, or the mirror cannot answer.
- Every client gets a minimal environment (PATH plus its own HOME, TMPDIR and config variables):
  nothing of the caller's (DOCKER_HOST, CONTAINERS_*, REGISTRY_AUTH_FILE, ~/.docker credential
  helpers) leaks in.
- skopeo copies to `dir:`, not `oci:`: the oci transport rewrites Docker schema2 manifests as
  OCI ones (a new digest) and cannot keep a schema2 list as is. Without `all_platforms` skopeo
  keeps only this platform's manifest, so that is the digest returned then.
- podman 4.3 has no `--retry` (added in 4.7): a pull that failed on a network error is retried 3
  times, 1 s apart; every command is bounded by `timeout` anyway. c/image never sends `--creds`
  (meant for docker.io) to a mirror: a mirror gets the auth-file entry of its own host, which
  `podman login MIRROR` writes and `pull(creds=…)` writes likewise. The netavark backend creates
  /run/containers/networks whatever the config says, so the private containers.conf picks CNI
  (unused by pulls) with a private config dir; `tmp_dir` keeps /run/libpod untouched.
- skopeo and podman, as root, keep c/image's blob-info cache in /var/lib/containers/cache and no
  flag moves it in these versions. It is digest metadata only (every pull still fetches into an
  empty store); the drivers delete it on close if it did not exist before.
- containerd: `disabled_plugins` drops CRI and the aufs/btrfs/zfs/devmapper snapshotters (no
  modprobe, no noise); the `opt` plugin would create /opt/containerd, so its path is private.
  overlayfs is used when containerd's own mount probe accepts it, else `native`. Mirror requests
  carry `?ns=docker.io`. `ctr` fetches in its own process, so its stderr is the whole story.
- dockerd 20.10 creates /etc/docker/key.json and /run/docker/plugins whatever its flags say; the
  driver deletes them on stop if they did not exist before. It runs on a containerd of its own
  (`--containerd`): the one it would manage itself creates /opt/containerd. `--iptables=false
  --ip-masq=false --ip-forward=false --bridge=none` keep it off the host's firewall, sysctls and
  interfaces; vfs needs no kernel support. cgroup v1 works (it warns about blkio). 127.0.0.0/8 is
  an insecure registry by default, so an `http://` mirror there needs no more config.
- dockerd: `registry-mirrors` and `max-download-attempts` are reloadable (SIGHUP). Docker retries
  a failed blob 5 times with 5 s, 10 s, … backoff by default; the driver sets 1 attempt so a
  broken blob fails at once (raise it to exercise Docker's retries). It logs a harmless "Error
  persisting manifest … failed size validation" on pulls by digest (a 20.10 + containerd 1.6
  quirk: its manifest cache stays empty, so pulls by digest still ask the mirror).
- dockerd: `docker login` cannot be used: the daemon checks credentials against the real Hub,
  never a mirror. `pull(creds=…)` writes what `docker login` would (`auths` of the private
  DOCKER_CONFIG); the CLI sends it with the pull and dockerd forwards it to the mirror when
  challenged.
- Daemons are started with PR_SET_PDEATHSIG, so a pytest that dies takes them along.

Fixtures (import them in a conftest): `client_drivers` (session: starts each driver on first use,
closes all at the end), `skopeo_client`, `podman_client`, `containerd_client`, `dockerd_client`
(wiped before each test), and `pull_client`, parametrized over all four.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from itertools import count
from pathlib import Path
from typing import ClassVar, Self, TypeVar, cast

import pytest

from tests.integration.registry import require_binary

Creds = tuple[str, str]
DEFAULT_TIMEOUT = 60.0


class ClientError(RuntimeError):
    """A client command failed or timed out; the message carries what it printed."""

    def __init__(
        self, client: str, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, log: str = ""
    ) -> None:
        self.client = client
        self.argv = list(argv)
        self.returncode = returncode  # None: killed at the timeout
        self.stdout = stdout
        self.stderr = stderr
        self.log = log
        status = "timed out" if returncode is None else f"exited with {returncode}"
        message = f"{client}: `{shlex.join(self.argv)}` {status}\nstderr:\n{stderr.strip()}"
        if log:
            message += f"\ndaemon log:\n{log.strip()}"
        super().__init__(message)


class PullError(ClientError):
    """A pull failed. No client can fall back to a real registry, so this is the mirror's doing."""


def reference(repo: str, ref: str) -> str:
    """`repo:tag`, or `repo@digest` when `ref` is a digest (tags cannot contain a colon)."""
    return f"{repo}@{ref}" if ":" in ref else f"{repo}:{ref}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BLOCKED = "real registries are blocked in tests"


@functools.cache
def _blocking_proxy() -> str:
    """URL of a loopback HTTP proxy (a thread of this process) that answers every request and every
    CONNECT with `403 <BLOCKED>`: the HTTP(S)_PROXY of every client, see the module doc."""
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_block_forever, args=(server,), name="blocking-proxy", daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def _block_forever(server: socket.socket) -> None:
    response = f"HTTP/1.1 403 {BLOCKED}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            try:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536 and (chunk := conn.recv(4096)):
                    head += chunk
                conn.sendall(response)
            except OSError:
                pass


def _client_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for a client process, with a proxy that blocks every real registry."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(exist_ok=True)
    proxy = _blocking_proxy()
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        **extra,
    }


def _basic(creds: Creds) -> str:
    """`user:password` in base64, as auth files (docker's config.json, podman's auth.json) keep it."""
    return base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _run(
    client: str,
    argv: Sequence[str],
    env: dict[str, str],
    timeout: float,
    *,
    error: type[ClientError] = ClientError,
    log: Callable[[], str] = lambda: "",
) -> bytes:
    """Run a client command to completion (killed at `timeout`); its stdout, or `error`."""
    try:
        done = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise error(client, argv, None, _text(e.stdout), _text(e.stderr), log()) from None
    if done.returncode != 0:
        raise error(client, argv, done.returncode, _text(done.stdout), _text(done.stderr), log())
    return done.stdout


def _text(output: bytes | None) -> str:
    return (output or b"").decode(errors="replace")


class _HostTraces:
    """Host paths a client creates outside its private directories whatever its flags say.
    Remembers which did not exist yet (their topmost missing ancestor) and deletes those."""

    def __init__(self, *paths: str) -> None:
        self._created: list[Path] = []
        for path in map(Path, paths):
            if not path.exists():
                while not path.parent.exists():
                    path = path.parent
                self._created.append(path)

    def remove(self) -> None:
        for path in self._created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child must not dlopen


def _die_with_parent() -> None:
    """Runs in a daemon's child process before exec: SIGTERM it if pytest dies (PR_SET_PDEATHSIG)."""
    _prctl(1, signal.SIGTERM)


class _Daemon:
    """A server process of ours, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool], timeout: float) -> None:
        """Start it and wait until `ready()`; on failure stop it and raise with its log."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not ready():
            returncode = self.process.poll()
            if returncode is not None or time.monotonic() > deadline:
                self.stop()
                raise ClientError(self.name, self.argv, returncode, "", "did not become ready", self.log_since(0))
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it lingers past `timeout`."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


class Client(ABC):
    """The common shape of the drivers; a context manager that releases what it holds on exit."""

    name: ClassVar[str]

    def __init__(self, workdir: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.timeout = timeout

    @abstractmethod
    def pull(self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None) -> str:
        """Pull docker.io/`repo` at `ref` (a tag or a digest) through the mirror at `mirror_host`
        (`127.0.0.1:PORT`); return the digest the reference resolved to."""

    @abstractmethod
    def remove_all(self) -> None:
        """Delete every pulled image and its content, so the next pull fetches everything again."""

    def start(self) -> None:
        """Start what the client needs (its daemon); nothing for the daemonless ones."""

    def close(self) -> None:
        """Stop what `start` started and delete the client's traces on the host."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        error: type[ClientError] = ClientError,
        log: Callable[[], str] = lambda: "",
    ) -> str:
        return _run(self.name, argv, env, self.timeout, error=error, log=log).decode()


class Skopeo(Client):
    """skopeo addressing the mirror by name (`docker://HOST/REPO:REF`), as a registry of its own."""

    name = "skopeo"

    def __init__(self, workdir: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(workdir, timeout)
        self.binary = require_binary("skopeo")
        self._env = _client_env(workdir / "home")
        self._images = workdir / "images"
        self._pulls = count()
        self._traces = _HostTraces("/var/lib/containers/cache")

    def pull(
        self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None, *, all_platforms: bool = True
    ) -> str:
        """Copy the image into a fresh `dir:` (every platform unless `all_platforms` is false, in
        which case the digest returned is this platform's manifest's)."""
        destination = self._images / str(next(self._pulls))
        self._images.mkdir(exist_ok=True)
        argv = [self.binary, "--insecure-policy", "copy", "--src-tls-verify=false", *self._creds("--src-", creds)]
        if all_platforms:
            argv.append("--all")
        argv += [f"docker://{mirror_host}/{reference(repo, ref)}", f"dir:{destination}"]
        self._run(argv, self._env, error=PullError)
        return sha256_digest((destination / "manifest.json").read_bytes())

    def inspect_raw(self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None) -> bytes:
        """The manifest bytes exactly as the mirror serves them."""
        argv = [self.binary, "inspect", "--raw", "--tls-verify=false", *self._creds("--", creds)]
        argv.append(f"docker://{mirror_host}/{reference(repo, ref)}")
        return _run(self.name, argv, self._env, self.timeout)

    def push(self, layout: Path, layout_ref: str, registry_host: str, repo: str, tag: str) -> str:
        """Push an image (every platform) from an OCI layout to a plain-HTTP registry without auth,
        e.g. to seed a stand-in upstream; return its manifest digest, unchanged by the copy."""
        digest_file = self.workdir / "pushed-digest"
        argv = [self.binary, "--insecure-policy", "copy", "--all", "--dest-tls-verify=false", "--dest-no-creds"]
        argv += ["--digestfile", str(digest_file), f"oci:{layout}:{layout_ref}"]
        argv.append(f"docker://{registry_host}/{repo}:{tag}")
        self._run(argv, self._env)
        return digest_file.read_text().strip()

    def remove_all(self) -> None:
        shutil.rmtree(self._images, ignore_errors=True)

    def close(self) -> None:
        self.remove_all()
        self._traces.remove()

    @staticmethod
    def _creds(prefix: str, creds: Creds | None) -> list[str]:
        return [f"{prefix}creds={creds[0]}:{creds[1]}"] if creds else [f"{prefix}no-creds"]


class Podman(Client):
    """podman with storage, configuration and auth file of its own, pulling `docker.io/…` through a
    `[[registry.mirror]]` of docker.io in its registries.conf, as users set up a mirror."""

    name = "podman"

    def __init__(self, workdir: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(workdir, timeout)
        self.binary = require_binary("podman")
        self._registries_conf = workdir / "registries.conf"
        self._auth_file = workdir / "auth.json"
        self._policy = workdir / "policy.json"
        self._write_config()
        self._env = _client_env(
            workdir / "home",
            CONTAINERS_CONF=str(workdir / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(workdir / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self._registries_conf),
            REGISTRY_AUTH_FILE=str(self._auth_file),
        )
        self._traces = _HostTraces("/var/lib/containers/cache")

    def _write_config(self) -> None:
        w = self.workdir
        (w / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{w / "storage"}"\nrunroot = "{w / "run"}"\n'
        )
        (w / "containers.conf").write_text(
            f'[engine]\ntmp_dir = "{w / "libpod"}"\nevents_logger = "none"\n'
            f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{w / "networks"}"\n'
        )
        # The host's policy.json could demand signatures; this one is what Debian ships.
        self._policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')

    def pull(
        self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None, *, registries_conf: Path | None = None
    ) -> str:
        """`creds` go to the auth file under the mirror's host, as `podman login MIRROR` stores them:
        c/image never sends `--creds` (meant for docker.io) to a mirror. `registries_conf`: pull with
        that file (e.g. one `mirror config podman` wrote) instead of the driver's own."""
        self._registries_conf.write_text(
            '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
            f'[[registry.mirror]]\nlocation = "{mirror_host}"\ninsecure = true\n'
        )
        auths = {mirror_host: {"auth": _basic(creds)}} if creds else {}
        self._auth_file.write_text(json.dumps({"auths": auths}) + "\n")
        name = f"docker.io/{reference(repo, ref)}"
        argv = [self.binary, "pull", "--quiet", "--signature-policy", str(self._policy), name]
        env = self._env
        if registries_conf is not None:
            env = {**env, "CONTAINERS_REGISTRIES_CONF": str(registries_conf)}
        self._run(argv, env, error=PullError)
        return self._run([self.binary, "image", "inspect", "--format", "{{.Digest}}", name], self._env).strip()

    def remove_all(self) -> None:
        self._run([self.binary, "rmi", "--all", "--force"], self._env)

    def close(self) -> None:
        self.remove_all()
        self._traces.remove()


class Containerd(Client):
    """A containerd daemon of our own, pulled into with `ctr images pull --hosts-dir`: the hosts.toml
    way users point containerd (and its CRI plugin) at a mirror. Also dockerd's containerd."""

    name = "containerd"

    def __init__(self, workdir: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(workdir, timeout)
        self.binary = require_binary("containerd")
        self.ctr_binary = require_binary("ctr")
        self.address = workdir / "containerd.sock"
        if len(str(self.address)) > 100:  # sun_path holds 108 bytes, and ".ttrpc" is appended
            raise ValueError(f"socket path too long for AF_UNIX: {self.address}")
        self.snapshotter = "native"
        self._hosts_dir = workdir / "hosts"
        self._env = _client_env(workdir / "home")
        config = workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{workdir / "root"}"\n'
            f'state = "{workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
            ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",'
            ' "io.containerd.snapshotter.v1.devmapper"]\n'
            f'[grpc]\naddress = "{self.address}"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\npath = "{workdir / "opt"}"\n'
        )
        self._daemon = _Daemon(
            "containerd", [self.binary, "--config", str(config)], workdir / "containerd.log", self._env
        )

    def start(self, timeout: float = 15.0) -> None:
        self._daemon.start(self._answers, timeout)
        # TYPE  ID  PLATFORMS  STATUS: "ok" only if the plugin's own overlay mount test passed.
        for line in self.ctr("plugins", "ls").splitlines():
            fields = line.split()
            if fields[:2] == ["io.containerd.snapshotter.v1", "overlayfs"] and fields[-1] == "ok":
                self.snapshotter = "overlayfs"

    def close(self) -> None:
        self._daemon.stop()

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.address))
            except OSError:
                return False
        return True

    def ctr(self, *args: str, error: type[ClientError] = ClientError) -> str:
        """Run `ctr` against this daemon (namespace "default"); its stdout."""
        argv = [self.ctr_binary, "--address", str(self.address), *args]
        return self._run(argv, self._env, error=error)

    def pull(
        self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None, *, hosts_dir: Path | None = None
    ) -> str:
        """`hosts_dir`: pull with that certs.d-style directory (e.g. one `mirror config containerd`
        wrote) as `--hosts-dir` instead of the driver's own."""
        if hosts_dir is None:
            hosts_dir = self._hosts_dir
            hosts = hosts_dir / "docker.io" / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(
                'server = "https://registry-1.docker.io"\n\n'
                f'[host."http://{mirror_host}"]\ncapabilities = ["pull", "resolve"]\n'
            )
        name = f"docker.io/{reference(repo, ref)}"
        options = ["--hosts-dir", str(hosts_dir), "--snapshotter", self.snapshotter]
        if creds:
            options += ["--user", f"{creds[0]}:{creds[1]}"]
        self.ctr("images", "pull", *options, name, error=PullError)
        # REF  TYPE  DIGEST  SIZE  PLATFORMS  LABELS
        rows = self.ctr("images", "ls", f"name=={name}").splitlines()[1:]
        return rows[0].split()[2]

    def remove_all(self) -> None:
        """Delete every image; the synchronous garbage collection then drops content and snapshots."""
        names = self.ctr("images", "ls", "--quiet").split()
        if names:
            self.ctr("images", "rm", "--sync", *names)


class Dockerd(Client):
    """A dockerd of our own (on a containerd of its own) with `registry-mirrors` in its daemon.json,
    pulled into with the docker CLI and a private DOCKER_CONFIG."""

    name = "dockerd"

    def __init__(self, workdir: Path, timeout: float = DEFAULT_TIMEOUT, max_download_attempts: int = 1) -> None:
        super().__init__(workdir, timeout)
        self.binary = require_binary("dockerd")
        self.cli = require_binary("docker")
        self.max_download_attempts = max_download_attempts
        self.socket = workdir / "docker.sock"
        self.mirror_host: str | None = None
        self.extra_config: dict[str, object] = {}  # merged into daemon.json, see `use_daemon_json`
        self._config_file = workdir / "daemon.json"
        self._docker_config = workdir / "docker-config"
        self._docker_config.mkdir(parents=True, exist_ok=True)
        self._write_daemon_json()
        self._env = _client_env(workdir / "home", DOCKER_CONFIG=str(self._docker_config))
        self._containerd = Containerd(workdir / "containerd", timeout)
        argv = [
            self.binary,
            "--config-file", str(self._config_file),
            "--data-root", str(workdir / "data"),
            "--exec-root", str(workdir / "exec"),
            "--pidfile", str(workdir / "dockerd.pid"),
            "--host", f"unix://{self.socket}",
            "--containerd", str(self._containerd.address),
            "--storage-driver", "vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--bridge=none",
        ]  # fmt: skip
        self._daemon = _Daemon("dockerd", argv, workdir / "dockerd.log", self._env)
        self._traces = _HostTraces("/etc/docker/key.json", "/run/docker/plugins")

    def start(self, timeout: float = 30.0) -> None:
        self._containerd.start()
        try:
            self._daemon.start(self._answers, timeout)
        except BaseException:
            self._containerd.close()
            raise

    def close(self) -> None:
        self._daemon.stop()
        self._containerd.close()
        self._traces.remove()

    def _answers(self) -> bool:
        try:
            self.docker("version", "--format", "{{.Server.Version}}")
        except ClientError:
            return False
        return True

    def docker(self, *args: str, error: type[ClientError] = ClientError, log_offset: int | None = None) -> str:
        """Run the docker CLI against this daemon; its stdout. With `log_offset`, a failure carries
        the daemon's log from there on."""
        argv = [self.cli, "--host", f"unix://{self.socket}", *args]
        log = (lambda: self._daemon.log_since(log_offset)) if log_offset is not None else (lambda: "")
        return self._run(argv, self._env, error=error, log=log)

    def _write_daemon_json(self) -> None:
        config: dict[str, object] = {"max-download-attempts": self.max_download_attempts}
        if self.mirror_host:
            config["registry-mirrors"] = [f"http://{self.mirror_host}"]
        config.update(self.extra_config)
        self._config_file.write_text(json.dumps(config, indent=2) + "\n")

    def use_mirror(self, mirror_host: str, timeout: float = 10.0) -> None:
        """Point `registry-mirrors` at `mirror_host`: rewrite daemon.json, SIGHUP, wait for the reload."""
        if mirror_host == self.mirror_host and not self.extra_config:
            return
        self.mirror_host, self.extra_config = mirror_host, {}
        self._reload([f"http://{mirror_host}"], timeout)

    def use_daemon_json(self, config: dict[str, object], timeout: float = 10.0) -> None:
        """Merge `config` (reloadable keys, e.g. a daemon.json `mirror config docker` wrote) into the
        driver's daemon.json in place of its own `registry-mirrors`, SIGHUP, wait for the reload."""
        if config == self.extra_config and self.mirror_host is None:
            return
        self.mirror_host, self.extra_config = None, dict(config)
        self._reload(cast(list[str], config.get("registry-mirrors", [])), timeout)

    def _reload(self, mirrors: list[str], timeout: float) -> None:
        self._write_daemon_json()
        assert self._daemon.process is not None, "dockerd is not running"
        self._daemon.process.send_signal(signal.SIGHUP)
        wanted = json.dumps([m.rstrip("/") + "/" for m in mirrors])
        deadline = time.monotonic() + timeout
        while self.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").strip() != wanted:
            if time.monotonic() > deadline:
                raise ClientError(
                    self.name, ["kill", "-HUP"], None, "", "mirror not reloaded", self._daemon.log_since(0)
                )
            time.sleep(0.05)

    def login(self, creds: Creds | None) -> None:
        """Store `creds` for docker.io in the private DOCKER_CONFIG as `docker login` would (None:
        log out). The real `docker login` is useless here: dockerd checks credentials against the
        real Hub, never a mirror."""
        auths = {"https://index.docker.io/v1/": {"auth": _basic(creds)}} if creds else {}
        (self._docker_config / "config.json").write_text(json.dumps({"auths": auths}, indent=2) + "\n")

    def pull(
        self, mirror_host: str, repo: str, ref: str, creds: Creds | None = None,
        *, daemon_json: dict[str, object] | None = None,
    ) -> str:
        """`daemon_json`: pull with those keys merged into daemon.json (`use_daemon_json`) instead
        of the driver's own `registry-mirrors` of `mirror_host`."""
        if daemon_json is None:
            self.use_mirror(mirror_host)
        else:
            self.use_daemon_json(daemon_json)
        self.login(creds)
        output = self.docker("pull", reference(repo, ref), error=PullError, log_offset=self._daemon.log_size())
        for line in output.splitlines():
            if line.startswith("Digest: "):
                return line.removeprefix("Digest: ").strip()
        raise ClientError(self.name, ["pull", reference(repo, ref)], 0, output, "no Digest line in the output")

    def remove_all(self) -> None:
        ids = set(self.docker("image", "ls", "--all", "--quiet", "--no-trunc").split())
        if ids:
            self.docker("image", "rm", "--force", *sorted(ids))


C = TypeVar("C", bound=Client)


class ClientDrivers:
    """The session's drivers, each created and started on first use and closed at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._stack = ExitStack()
        self._drivers: dict[type[Client], Client] = {}

    def get(self, kind: type[C]) -> C:
        """The session's `kind` driver, wiped of earlier pulls."""
        driver = self._drivers.get(kind)
        if driver is None:
            driver = self._stack.enter_context(kind(self._tmp.mktemp(kind.name)))
            self._drivers[kind] = driver
        driver.remove_all()
        return cast(C, driver)

    def close(self) -> None:
        self._stack.close()


ALL_CLIENTS: tuple[type[Client], ...] = (Skopeo, Podman, Containerd, Dockerd)


@pytest.fixture(scope="session")
def client_drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientDrivers]:
    drivers = ClientDrivers(tmp_path_factory)
    yield drivers
    drivers.close()


@pytest.fixture(params=ALL_CLIENTS, ids=[c.name for c in ALL_CLIENTS])
def pull_client(request: pytest.FixtureRequest, client_drivers: ClientDrivers) -> Client:
    """Each real client in turn, with nothing pulled yet."""
    return client_drivers.get(cast(type[Client], request.param))


@pytest.fixture
def skopeo_client(client_drivers: ClientDrivers) -> Skopeo:
    return client_drivers.get(Skopeo)


@pytest.fixture
def podman_client(client_drivers: ClientDrivers) -> Podman:
    return client_drivers.get(Podman)


@pytest.fixture
def containerd_client(client_drivers: ClientDrivers) -> Containerd:
    return client_drivers.get(Containerd)


@pytest.fixture
def dockerd_client(client_drivers: ClientDrivers) -> Dockerd:
    return client_drivers.get(Dockerd)
