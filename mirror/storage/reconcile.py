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
from pathlib import Path

from mirror.manifest import MANIFEST_MAX_BYTES, InvalidManifest, digest_of as manifest_digest, media_type_of

from mirror.storage.blobs import ContentStore
from mirror.storage.metadata import Metadata

log = logging.getLogger("mirror.storage")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _identify(path: Path, digest: str) -> tuple[str, str | None] | None:
    """(kind, media type) of a file that is what its name says, None if it is not.

    A signed schema1 manifest is digested over its payload, so a file that does not hash
    to its name may still be one.
    """
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        return ("blob", None) if _sha256_file(str(path)) == digest else None
    body = path.read_bytes()
    media_type = media_type_of(body, None)
    if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
        return ("manifest", media_type) if media_type else ("blob", None)
    try:
        signed = media_type is not None and manifest_digest(body) == digest
    except InvalidManifest:
        signed = False
    return ("manifest", media_type) if signed else None


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
        found = await asyncio.to_thread(_identify, path, digest)
        if found is None:
            log.warning("removing %s: its content does not match its name", path)
            store.remove(digest)
            continue
        kind, media_type = found
        await metadata.add_content(digest, path.stat().st_size, media_type, kind, time.time())
        adopted += 1
    if adopted:
        log.info("adopted %d verified files that had no metadata row", adopted)
    return len(missing), adopted
