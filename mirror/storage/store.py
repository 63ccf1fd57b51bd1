"""What the mirror needs of a content store: verified bytes by digest, blobs and manifests alike.

`FileStore` (filestore.py) keeps them in the data directory. A fleet's bucket (bucket.py) is not
another ContentStore but a shared tier beside it: each mirror keeps serving from its own store
(sendfile from a real file, readers following a growing temp file), copies into it what the
bucket holds, and uploads to the bucket what it fetched from upstream.

Every method that takes a digest raises ValueError for one that is not a valid `sha256:` digest.
"""
from __future__ import annotations

from typing import BinaryIO, Collection, Protocol, Sequence


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest (or size) they were fetched for."""


class BlobWriter(Protocol):
    """One write in progress: bytes go to a temp file, and reach the store only by `commit`."""

    temp_name: str  # names the temp file to `ContentStore.open_temp`, in this or another worker process
    written: int  # bytes fed to the digest check so far
    on_disk: int  # bytes in the temp file so far

    def open_written(self) -> BinaryIO:
        """The temp file open for reading, with its own descriptor: readers `pread` and sendfile
        from it while it grows."""

    def hash(self, parts: Sequence[bytes | memoryview]) -> None:
        """Feed bytes to the digest check (blocking: run it in a worker thread for large parts)."""

    def append(self, parts: Sequence[bytes | memoryview]) -> None:
        """Add bytes to the temp file (blocking). On an OSError (a full disk) `on_disk` says how far it got."""

    def verify(self) -> None:
        """Raise DigestMismatch unless every byte hashed to the digest, at the expected size."""

    def commit(self) -> None:
        """Verify, make durable, and publish at the digest (blocking); raises DigestMismatch.
        Nothing unverified is ever published."""

    def close(self) -> None:
        """Release the temp file; an uncommitted one is deleted."""


class ContentStore(Protocol):
    location: str  # where the content lives, for people to read (a directory, a bucket)

    def prepare(self) -> None:
        """Make ready for writing, and remove temp files a dead process left."""

    def writable(self) -> bool:
        """Whether a write can start now (for readiness)."""

    def open(self, digest: str) -> BinaryIO | None:
        """The stored content open for reading (a real file: sendfile can send it), or None when
        it is not stored. Bytes stay readable through the returned file even if removed meanwhile."""

    def size(self, digest: str) -> int | None:
        """Bytes of the stored content, or None when it is not stored."""

    def read(self, digest: str) -> bytes | None:
        """The whole stored content (for manifests: small), or None when it is not stored."""

    def put(self, digest: str, data: bytes) -> None:
        """Store a manifest already in memory, verified by the manifest digest rule (a signed
        schema1's digest covers its payload, not its bytes); raises DigestMismatch."""

    def writer(self, digest: str, expected_size: int | None = None) -> BlobWriter:
        """Start writing the content of `digest` (of `expected_size` bytes, when known)."""

    def remove(self, digest: str) -> None:
        """Delete stored content; readers that opened it keep their bytes. Absent content is no error."""

    def digests(self, shard: str | None = None) -> list[str]:
        """Every digest stored, or those whose hex begins with the two hex digits `shard` (for
        reconciliation with the metadata, a shard at a time)."""

    def open_temp(self, temp_name: str) -> BinaryIO:
        """A write in progress's temp file (`BlobWriter.temp_name`), open for reading. Raises
        FileNotFoundError once it is gone (committed or failed), OSError for a name that is not one."""

    def remove_temp_files(self, keep: Collection[str]) -> int:
        """Delete temp files except those named in `keep` (the writes in progress); returns how many went."""
