"""The content store in the data directory: verified bytes at paths derived only from validated digests.

Layout: `<root>/content/sha256/<2 hex>/<64 hex>` for blobs and manifests alike,
`<root>/tmp/` for writes in progress. A file reaches a content path only by an
atomic rename after its sha256 and size were checked, so a reader never sees a
partial or unverified file there, whatever instant the process dies at.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Collection, Sequence

from mirror.manifest import InvalidManifest, digest_of as manifest_digest
from mirror.reference import SHA256_RE
from mirror.storage.store import DigestMismatch


class FileStore:
    """A `ContentStore` (mirror.storage.store) in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self.content_dir = root / "content" / "sha256"
        self.tmp_dir = root / "tmp"

    def prepare(self) -> None:
        """Create the layout and empty `tmp/`: whatever is there is from a dead process."""
        self.content_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files(())

    def writable(self) -> bool:
        """Whether a file can be created where fetches write (for readiness)."""
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=".ready-")
        except OSError:
            return False
        os.close(fd)
        os.unlink(name)
        return True

    def path(self, digest: str) -> Path:
        if not SHA256_RE.fullmatch(digest):
            raise ValueError(f"refusing to build a path from unvalidated digest {digest!r}")
        hexpart = digest[7:]
        return self.content_dir / hexpart[:2] / hexpart

    def open(self, digest: str) -> BinaryIO | None:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            return None

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, digest: str, data: bytes) -> None:
        try:
            actual = manifest_digest(data)
        except InvalidManifest as exc:
            raise DigestMismatch(f"{digest}: {exc}") from None
        if actual != digest:
            raise DigestMismatch(f"expected {digest}, manifest hashes to {actual}")
        writer = FileWriter(self, digest, len(data), checked=True)
        try:
            writer.write(data)
            writer.commit()
        finally:
            writer.close()

    def writer(self, digest: str, expected_size: int | None = None) -> FileWriter:
        return FileWriter(self, digest, expected_size)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self, shard: str | None = None) -> list[str]:
        """Every digest with a file at its content path (in `shard`'s directory only, if given)."""
        found = []
        with os.scandir(self.content_dir) as directories:
            for sub in directories:
                if (shard is not None and sub.name != shard) or not sub.is_dir(follow_symlinks=False):
                    continue  # a stray file is not ours to judge, and must not stop the start
                with os.scandir(sub.path) as files:  # file types from the listing: no stat per file
                    found += ["sha256:" + f.name for f in files
                              if f.name[:2] == sub.name and SHA256_RE.fullmatch("sha256:" + f.name)
                              and f.is_file(follow_symlinks=False)]
        return found

    def open_temp(self, temp_name: str) -> BinaryIO:
        if not temp_name or Path(temp_name).name != temp_name or temp_name in (".", ".."):
            raise OSError(f"unexpected temp file name {temp_name!r}")
        return open(self.tmp_dir / temp_name, "rb")

    def remove_temp_files(self, keep: Collection[str]) -> int:
        removed = 0
        for path in list(self.tmp_dir.iterdir()):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev may take


class FileWriter:
    """A `BlobWriter` (mirror.storage.store): writes to `tmp/<random>`, hashing as it goes;
    `commit` verifies, fsyncs and renames."""

    def __init__(self, store: FileStore, digest: str, expected_size: int | None, checked: bool = False) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.checked = checked  # the caller verified the digest (FileStore.put)
        self.final_path = store.path(digest)
        self.temp_name = f"{digest[7:19]}-{secrets.token_hex(8)}"
        self.tmp_path = store.tmp_dir / self.temp_name
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._hash = hashlib.sha256()
        self.written = 0  # bytes seen (hashed)
        self.on_disk = 0  # bytes in the temp file
        self._done = False

    def open_written(self) -> BinaryIO:
        return open(self.tmp_path, "rb")

    def write(self, data: bytes | memoryview) -> None:
        """Append and hash (blocking: large chunks go through a worker thread)."""
        self.hash([data])
        self.append([data])

    def hash(self, parts: Sequence[bytes | memoryview]) -> None:
        for part in parts:
            self._hash.update(part)
            self.written += len(part)

    def append(self, parts: Sequence[bytes | memoryview]) -> None:
        """Add bytes to the temp file, several parts per system call and never copied together."""
        pending = [memoryview(p) for p in parts if len(p)]
        while pending:
            n = os.writev(self._fd, pending[:_IOV_MAX])
            self.on_disk += n
            while pending and n >= len(pending[0]):
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def verify(self) -> None:
        if self.expected_size is not None and self.written != self.expected_size:
            raise DigestMismatch(f"{self.digest}: expected {self.expected_size} bytes, got {self.written}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest and not self.checked:
            raise DigestMismatch(f"expected {self.digest}, content hashes to {actual}")

    def commit(self) -> None:
        """Verify size and digest, fsync, then atomically rename to the content path."""
        self.verify()
        if self.on_disk != self.written:
            raise DigestMismatch(f"{self.digest}: {self.written} bytes checked but {self.on_disk} written")
        os.fsync(self._fd)
        self.final_path.parent.mkdir(exist_ok=True)
        os.rename(self.tmp_path, self.final_path)
        dir_fd = os.open(self.final_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._done = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._done:
            self.tmp_path.unlink(missing_ok=True)
