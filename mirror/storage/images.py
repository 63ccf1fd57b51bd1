"""What an image is made of, as far as the cache holds it."""
from __future__ import annotations

from mirror.manifest import referenced_digests
from mirror.storage.metadata import Metadata
from mirror.storage.store import ContentStore


async def image_parts(metadata: Metadata, store: ContentStore, digest: str) -> tuple[set[str], bool]:
    """A manifest and everything it references, through indexes down to layers.

    The flag says whether every part is in the cache: only then is the set final.
    """
    parts: set[str] = set()
    complete = True
    todo = [digest]
    while todo:
        current = todo.pop()
        if current in parts:
            continue
        parts.add(current)
        row = await metadata.content.get(current)
        if row is None:
            complete = False
        elif row.kind == "manifest" and (body := store.read(current)) is not None:
            todo.extend(referenced_digests(body))
    return parts, complete
