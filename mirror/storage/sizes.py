"""A blob's size as the cached manifests of its repository give it.

Every descriptor in a manifest names the size of what it points at (OCI image spec,
descriptor `size`), and the manifest's digest covers those sizes: a blob's size is known
before upstream sends a byte of it, even from an upstream that sends it without
Content-Length. Descriptors are recorded per manifest the first time a size is asked of its
repository, so each stored manifest is read once.
"""
from __future__ import annotations

import asyncio

from mirror.manifest import descriptor_sizes
from mirror.storage.metadata import Metadata
from mirror.storage.store import ContentStore


async def descriptor_size(metadata: Metadata, store: ContentStore, upstream: str, repo: str,
                          digest: str) -> int | None:
    """The size in bytes that a stored manifest linked to `repo` gives `digest`; None if none does."""
    size = await metadata.descriptors.size(upstream, repo, digest)
    if size is not None:
        return size
    pending = await metadata.descriptors.undescribed(upstream, repo)
    for manifest in pending:
        body = await asyncio.to_thread(store.read, manifest)
        if body is not None:
            await metadata.descriptors.add(manifest, {manifest: len(body), **descriptor_sizes(body)})
    return await metadata.descriptors.size(upstream, repo, digest) if pending else None
