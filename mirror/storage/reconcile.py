"""Start-up reconciliation of the content store with its metadata.

A crash can leave verified content whose row was never written (it is re-hashed
and adopted) or, after manual deletion, a row without content (it is dropped).
Content and rows that agree are trusted as they are: nothing is re-hashed, so a
start with many cached objects stays fast.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import BinaryIO

from mirror.manifest import MANIFEST_MAX_BYTES, InvalidManifest, digest_of as manifest_digest, media_type_of
from mirror.storage.metadata import Metadata
from mirror.storage.store import ContentStore

log = logging.getLogger("mirror.storage")


def _identify(file: BinaryIO, digest: str) -> tuple[str, str | None] | None:
    """(kind, media type) of content that is what its digest says, None if it is not.

    A signed schema1 manifest is digested over its payload, so content that does not hash
    to its digest may still be one.
    """
    if os.fstat(file.fileno()).st_size > MANIFEST_MAX_BYTES:
        h = hashlib.sha256()
        while chunk := file.read(1 << 20):
            h.update(chunk)
        return ("blob", None) if "sha256:" + h.hexdigest() == digest else None
    body = file.read()
    media_type = media_type_of(body, None)
    if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
        return ("manifest", media_type) if media_type else ("blob", None)
    try:
        signed = media_type is not None and manifest_digest(body) == digest
    except InvalidManifest:
        signed = False
    return ("manifest", media_type) if signed else None


def _examine(store: ContentStore, digest: str) -> tuple[int, tuple[str, str | None] | None] | None:
    """(size, what `_identify` says) of stored content; None if it is gone."""
    file = store.open(digest)
    if file is None:
        return None
    with file:
        return os.fstat(file.fileno()).st_size, _identify(file, digest)


async def reconcile(store: ContentStore, metadata: Metadata) -> tuple[int, int]:
    """Make rows and stored content agree; returns (dropped rows, adopted content)."""
    rows = await metadata.content.sizes()
    stored = set(await asyncio.to_thread(store.digests))
    missing = [d for d in rows if d not in stored]
    if missing:
        log.warning("dropping %d metadata rows whose content is gone", len(missing))
        await metadata.drop_content(missing)
    adopted = 0
    for digest in stored.difference(rows):
        examined = await asyncio.to_thread(_examine, store, digest)
        if examined is None:
            continue
        size, found = examined
        if found is None:
            log.warning("removing %s from %s: its content does not match its digest", digest, store.location)
            store.remove(digest)
            continue
        kind, media_type = found
        await metadata.content.add(digest, size, media_type, kind, time.time())
        adopted += 1
    if adopted:
        log.info("adopted %d verified objects that had no metadata row", adopted)
    return len(missing), adopted
