"""Starting and stopping the servers integration tests run as subprocesses."""
from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable


def http_status(url: str) -> int | None:
    """The status `url` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_ready(process: subprocess.Popen[bytes], ready: Callable[[], bool], name: str, timeout: float,
               log_tail: Callable[[], str]) -> None:
    """Poll `ready` until it holds; stop the process and raise with its log if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        if ready():
            return
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{log_tail()}")


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal the process and reap it (killing it if it lingers); its exit status."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
