"""The admin API's unix socket, `<data_dir>/admin.sock`: owner-only, replaced when stale, removed at exit.

Whoever can open the socket may run cache maintenance, so it is mode 0600 before
it listens: only the user the mirror runs as (and root) can connect. The process
that makes it holds the data directory's lock, so a socket already at the path
was left by a mirror that died, and is replaced. Linux limits a socket's address
to 107 bytes; a longer path is reached through its directory's descriptor
(`/proc/self/fd/N/admin.sock`), so any data directory works.
"""
from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

NAME = "admin.sock"
_ADDRESS_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class AdminSocketError(Exception):
    """The socket's path holds something that is not a socket; nothing was changed."""


def path_in(data_dir: Path | str) -> Path:
    """Where the admin socket of the mirror on `data_dir` is."""
    return Path(data_dir).absolute() / NAME


class AdminSocket:
    """A listening socket at `path`, made by `open` and removed by `close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket: socket.socket | None = None
        self._inode = -1

    def open(self) -> socket.socket:
        """Bind and listen at `path` (mode 0600), replacing a stale socket there.

        Raises AdminSocketError if the path is a file, a directory or anything but a
        socket, and OSError if it cannot be made (no such directory, no permission).
        """
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(found.st_mode):
                raise AdminSocketError(
                    f"{self.path} exists and is not a socket: the mirror serves its admin API there; "
                    "move it out of the data directory")
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(self.path) as address:
                sock.bind(address)
            # before listen(): until then a connection is refused, so none gets in under the umask's mode
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        return sock

    def close(self) -> None:
        """Close the socket and remove its path, unless something else has taken the path since."""
        if self._socket is None:
            return
        self._socket.close()
        self._socket = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the admin socket at `path`.

    Raises FileNotFoundError (no socket there), PermissionError (not its owner, nor
    root), ConnectionRefusedError (no mirror listens on it) or another OSError.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """`path` as a socket address: itself, or through its directory's descriptor when too long."""
    if len(os.fsencode(path)) <= _ADDRESS_MAX:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)
