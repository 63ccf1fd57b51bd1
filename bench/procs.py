"""Processes the bench starts (each in its own process group, always stopped), free loopback
ports, and peak-RSS sampling of a process tree."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM me when the bench dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Every process started through `Managed` and not yet stopped; `stop_all` is the safety net.
_LIVE: list["Managed"] = []
_LIVE_LOCK = threading.Lock()


def exit_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler for the bench's entry points: exit through the `finally` that stops every process."""
    raise SystemExit(128 + signum)


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Managed:
    """A child process in its own session (so its whole group can be signalled)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=cwd, preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout`; returns the exit status."""
        try:
            if self.popen.poll() is None:
                _signal_group(self.popen.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=10)
            # Anything the leader left behind in its group (nginx workers, …) goes too.
            _signal_group(self.popen.pid, signal.SIGKILL)
        finally:
            with _LIVE_LOCK:
                if self in _LIVE:
                    _LIVE.remove(self)
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Stop every process still running (called from the CLI's `finally`)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in reversed(live):
        try:
            proc.stop(timeout=5)
        except Exception:  # noqa: BLE001 - the safety net must try them all
            pass


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll `predicate` until true (True), timeout or `alive()` turning false (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return predicate()


# --- RSS ----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo and len(seen) < 10_000:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssMonitor:
    """Samples the summed VmRSS of a process tree every `interval` s in a thread.

    `tree_mib`: the peak of the sum over the tree (nginx master + workers, …).
    `proc_mib`: the largest single process (VmHWM when `owned`, i.e. the process was started
    for this measurement, so its high-water mark covers it; sampled VmRSS otherwise).
    """

    def __init__(self, pid_fn: Callable[[], int | None], owned: bool = True, interval: float = 0.02) -> None:
        self._pid_fn = pid_fn
        self.owned = owned
        self.interval = interval
        self.tree_kib = 0
        self.proc_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample(self) -> None:
        pid = self._pid_fn()
        if pid is None:
            return
        pids = process_tree(pid)
        rss = [_status_kib(p, "VmRSS:") for p in pids]
        self.tree_kib = max(self.tree_kib, sum(rss))
        self.proc_kib = max(self.proc_kib, max(rss, default=0))
        if self.owned:
            hwm = [_status_kib(p, "VmHWM:") for p in pids]
            self.proc_kib = max(self.proc_kib, max(hwm, default=0))
            self.tree_kib = max(self.tree_kib, max(hwm, default=0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5)
        self.sample()

    @property
    def tree_mib(self) -> float:
        return self.tree_kib / 1024

    @property
    def proc_mib(self) -> float:
        return self.proc_kib / 1024
