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
from typing import BinaryIO, Iterable

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


SHARDS = [f"{i:02x}" for i in range(256)]
ONE_PASS = 65_536  # up to this many rows, the whole store is compared at once (a shard costs two hops)


async def reconcile(store: ContentStore, metadata: Metadata) -> tuple[int, int]:
    """Make rows and stored content agree; returns (dropped rows, adopted content).

    A large store goes one shard of digests (their first two hex digits) at a time: memory stays
    that of a 256th of the cache (a million objects held at once took 400 MiB).
    """
    dropped = adopted = 0
    shards: list[str | None] = [*SHARDS] if await metadata.content.count() > ONE_PASS else [None]
    for shard in shards:
        rows = await metadata.content.sizes(shard)
        stored = set(await asyncio.to_thread(store.digests, shard))
        missing = [d for d in rows if d not in stored]
        if missing:
            await metadata.drop_content(missing)
            dropped += len(missing)
        adopted += await _adopt(store, metadata, stored.difference(rows))
    if dropped:
        log.warning("dropped %d metadata rows whose content is gone", dropped)
    if adopted:
        log.info("adopted %d verified objects that had no metadata row", adopted)
    return dropped, adopted


async def _adopt(store: ContentStore, metadata: Metadata, digests: Iterable[str]) -> int:
    """Give verified content without a row its row; remove what does not match its digest."""
    adopted = 0
    for digest in digests:
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
    return adopted
