"""One process owns a data directory: the server, or a maintenance command while it is stopped."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirBusy(Exception):
    """Another process holds the data directory."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise DataDirBusy; the kernel drops it if the process dies."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(f"{self.path.parent} is in use by a running mirror") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
