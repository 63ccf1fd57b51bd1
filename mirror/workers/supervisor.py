"""`server.workers > 1`: one supervisor process and its workers, sharing the port with SO_REUSEPORT.

The supervisor holds the data directory lock and the listening sockets (one per
worker, so the kernel spreads connections over them and a restarted worker finds
its queue intact), forks the primary, waits until it answers, then forks the
secondaries. A worker that dies is restarted; SIGTERM or SIGINT stops them all,
each finishing its running responses. Workers die with the supervisor.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import multiprocess

from mirror.adminsocket import AdminSocketError
from mirror.app import make_app
from mirror.config import EXIT_CONFIG, Config
from mirror.observe import ACCESS_LOGGER, AccessLogger, setup_logging
from mirror.server import MirrorRunner, until_signalled
from mirror.storage.lock import DataDirLock
from mirror.storage.secret import data_dir_secret
from mirror.storage.bucket import BucketError
from mirror.storage.metadata import SchemaTooNew
from mirror.workers.role import WorkerRole

log = logging.getLogger("mirror.workers")

READY_TIMEOUT = 600.0  # a primary re-verifies files a crash left without metadata before it answers
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)  # seconds, for workers that keep dying young
STEADY = 60.0  # a worker that lived this long starts over at the shortest delay
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class _Worker:
    role: WorkerRole
    sockets: list[socket.socket]  # one per listening address
    pid: int = 0
    started: float = 0.0
    failures: int = 0


def listen(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """For each of `count` workers, a socket on every address `host` names, with SO_REUSEPORT.

    A plain bind first, so a port held by anything else (another mirror included)
    is refused instead of silently shared. IPv6 sockets are IPv6 only, as asyncio
    makes them for a single process.
    """
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    groups: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for family, address in addresses:
            with _socket(family) as probe:
                probe.bind((address[0], port, *address[2:]))
                port = probe.getsockname()[1]  # the one the kernel chose, if asked for any
                address = (address[0], port, *address[2:])
            for group in groups:
                s = _socket(family)
                group.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(address)
                s.listen(1024)
                s.setblocking(False)
    except OSError:
        for s in (s for group in groups for s in group):
            s.close()
        raise
    return groups


def _socket(family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s


def serve(config: Config, tls: ssl.SSLContext | None, host: str, port: int) -> int:
    """Run `config.server.workers` workers until SIGTERM or SIGINT; the exit status."""
    data_dir = Path(config.server.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    lock.acquire()
    runtime = tempfile.mkdtemp(prefix="mirror-")  # private (0700): the primary's socket, metrics files
    try:
        metrics_dir = os.path.join(runtime, "metrics")
        os.mkdir(metrics_dir)
        data_dir_secret(data_dir)  # created once, before any worker reads it
        groups = listen(host, port, config.server.workers)
        workers = [_Worker(WorkerRole(i, os.path.join(runtime, "primary.sock"), metrics_dir), group)
                   for i, group in enumerate(groups)]
        return _Supervisor(config, tls, workers).run(f"{'https' if tls else 'http'}://{host}:{port}")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        lock.release()


class _Supervisor:
    def __init__(self, config: Config, tls: ssl.SSLContext | None, workers: list[_Worker]) -> None:
        self.config = config
        self.tls = tls
        self.workers = workers
        self.stopping = False

    def run(self, url: str) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        for worker in self.workers:
            status = self._start(worker)
            if status is not None:
                self._stop_all()
                return 0 if self.stopping and status < 0 else status
            if worker.role.primary:  # it answers from now on; others' connections wait for them briefly
                logging.getLogger("mirror").info("listening on %s", url)
        return self._watch()

    def _stop(self, signum: int, frame: object) -> None:
        if not self.stopping:
            log.info("stopping %d workers (%s)", len(self.workers), signal.Signals(signum).name)
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.pid:
                try:
                    os.kill(worker.pid, sig)
                except ProcessLookupError:
                    pass

    def _stop_all(self) -> None:
        self.stopping = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        self._signal_all(signal.SIGTERM)
        while any(w.pid for w in self.workers):
            self._reap(os.wait())

    def _start(self, worker: _Worker) -> int | None:
        """Fork `worker` and wait until it serves; None, or its exit status if it died first."""
        read_end, write_end = os.pipe()
        pid = _fork()
        if pid == 0:
            os.close(read_end)
            self._child(worker, write_end)
        os.close(write_end)
        worker.pid, worker.started = pid, time.monotonic()
        try:
            ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
            started = bool(ready) and os.read(read_end, 1) == b"r"
        finally:
            os.close(read_end)
        if started:
            return None
        if ready:  # the pipe closed: the worker died while starting
            _, status = os.waitpid(pid, 0)
            worker.pid = 0
            return os.waitstatus_to_exitcode(status) or 1
        log.error("worker %d did not start within %.0fs", worker.role.index, READY_TIMEOUT)
        return 1

    def _child(self, worker: _Worker, ready_fd: int) -> None:
        """The worker process: never returns into the supervisor's code."""
        status = 1
        try:
            _die_with_parent()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            for other in self.workers:
                if other is not worker:
                    for s in other.sockets:
                        s.close()
            setup_logging(self.config.server.log_level, self.config.server.log_format)
            status = run_worker(self.config, self.tls, worker.role, worker.sockets, ready_fd)
        except BaseException:  # noqa: BLE001  # report anything, then leave without unwinding the parent's stack
            log.exception("worker %d failed", worker.role.index)
        finally:
            logging.shutdown()
            os._exit(status)

    def _watch(self) -> int:
        """Restart workers that die, until told to stop and all have stopped; the exit status."""
        status_code = 0
        while any(w.pid for w in self.workers):
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            worker = self._reap((pid, status))
            if worker is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            lived = time.monotonic() - worker.started
            worker.failures = 0 if lived > STEADY else worker.failures + 1
            delay = RESTART_DELAYS[min(worker.failures, len(RESTART_DELAYS) - 1)]
            log.error("worker %d (pid %d) exited with %s after %.0fs; restarting it in %gs",
                      worker.role.index, pid, f"signal {-code}" if code < 0 else f"status {code}", lived, delay)
            time.sleep(delay)
            if not self.stopping and self._start(worker) is not None:
                log.error("worker %d could not be restarted; stopping", worker.role.index)
                status_code = 1
                self._stop_all()
        return status_code

    def _reap(self, waited: tuple[int, int]) -> _Worker | None:
        pid = waited[0]
        for worker in self.workers:
            if worker.pid == pid:
                worker.pid = 0
                multiprocess.mark_process_dead(pid, worker.role.metrics_dir)
                return worker
        return None


def _fork() -> int:
    """os.fork, with log handlers flushed and held, and SIGTERM/SIGINT held back until the
    child has put its own handlers in place (a signal then stops it as it should)."""
    handlers = logging.getLogger().handlers
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    for handler in handlers:
        handler.flush()  # else lines buffered here would be written by the child too
        handler.acquire()  # no thread of ours is then halfway through writing to stderr
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:  # the parent, or a failed fork; a child's logging re-creates the locks itself
            for handler in handlers:
                handler.release()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    return pid


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM if the supervisor dies, so no worker outlives it."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a worker may then outlive a supervisor killed with -9
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os._exit(1)


def run_worker(config: Config, tls: ssl.SSLContext | None, role: WorkerRole, sockets: list[socket.socket],
               ready_fd: int) -> int:
    """Serve on `sockets` (and, for the primary, on its unix socket) until SIGTERM or SIGINT."""
    try:
        asyncio.run(_serve_worker(config, tls, role, sockets, ready_fd))
    except (SchemaTooNew, AdminSocketError, BucketError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"mirror: worker {role.index} cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_worker(config: Config, tls: ssl.SSLContext | None, role: WorkerRole,
                        sockets: list[socket.socket], ready_fd: int) -> None:
    runner = MirrorRunner(
        make_app(config, role=role), access_log_class=AccessLogger.for_worker(role.index), access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=config.server.shutdown_timeout,
    )
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=tls).start()
        if role.primary:  # plain HTTP: only sibling workers can open the private directory it is in
            await web.UnixSite(runner, role.primary_socket).start()

        def ready() -> None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        await until_signalled(ready)
    finally:
        await runner.cleanup()
