"""Start-up reconciliation of the content store with its metadata.

A crash can leave a verified file whose row was never written (it is re-hashed
and adopted) or, after manual deletion, a row without a file (it is dropped).
Files and rows that agree are trusted as they are: nothing is re-hashed, so a
start with many cached objects stays fast.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from mirror.storage.blobs import ContentStore
from mirror.storage.metadata import Metadata

log = logging.getLogger("mirror.storage")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def reconcile(store: ContentStore, metadata: Metadata) -> tuple[int, int]:
    """Make rows and files agree; returns (dropped rows, adopted files)."""
    rows = await metadata.all_content()
    files = set(await asyncio.to_thread(store.iter_digests))
    missing = [d for d in rows if d not in files]
    if missing:
        log.warning("dropping %d metadata rows whose files are gone", len(missing))
        await metadata.drop_content(missing)
    adopted = 0
    for digest in files.difference(rows):
        path = store.path(digest)
        if await asyncio.to_thread(_sha256_file, str(path)) != digest:
            log.warning("removing %s: its content does not match its name", path)
            store.remove(digest)
            continue
        await metadata.add_content(digest, path.stat().st_size, None, "blob", time.time())
        adopted += 1
    if adopted:
        log.info("adopted %d verified files that had no metadata row", adopted)
    return len(missing), adopted
