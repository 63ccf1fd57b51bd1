"""What a manifest's own bytes say: its digest, its media type and the content it references.

Upstreams and CDNs do not always describe a manifest well: some send it as
`text/plain`, `application/json` or `binary/octet-stream`, and signed schema1
manifests are digested over their payload, not their bytes. Everything here
works from the bytes, so a manifest is stored and served the same way whatever
its upstream said about it.
"""
from __future__ import annotations

import hashlib
import json

from mirror import schema1
from mirror.mediatypes import (
    MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, SCHEMA1, SCHEMA1_SIGNED,
)
from mirror.reference import SHA256_RE

InvalidManifest = schema1.InvalidSchema1
MANIFEST_MAX_BYTES = 4 << 20  # larger than any real manifest; bounds what is read into memory


def _parse(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def digest_of(body: bytes) -> str:
    """The manifest's digest: sha256 of its bytes, or of the signed payload of a signed schema1.

    Raises InvalidManifest for a signed schema1 whose signatures disagree or do not verify.
    """
    covered = schema1.payload(body) if schema1.is_signed(_parse(body)) else body
    return "sha256:" + hashlib.sha256(covered).hexdigest()


def media_type_of(body: bytes, declared: str | None) -> str | None:
    """The manifest's media type: upstream's when it names a manifest type, else the body's.

    The body's own `mediaType` field wins; without one its structure decides: schemaVersion 1
    is schema1 (signed or not), a `manifests` list an OCI index, `config` and `layers` an
    OCI image manifest (Docker's formats require the field, OCI's do not). None when the
    bytes are no manifest at all.
    """
    if declared in MANIFEST_TYPES:
        return declared
    doc = _parse(body)
    if not isinstance(doc, dict):
        return None
    field = doc.get("mediaType")
    if field in MANIFEST_TYPES:
        return str(field)
    version = doc.get("schemaVersion")
    if version == 1 and isinstance(doc.get("fsLayers"), list):
        return SCHEMA1_SIGNED if "signatures" in doc else SCHEMA1
    if version != 2 or field is not None:
        return None
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    return None


def descriptors(doc: object) -> list[dict[str, object]]:
    """The descriptors of a parsed manifest or index (OCI image spec): config, subject, layers,
    child manifests and blobs, in that order; anything that is not an object is left out."""
    if not isinstance(doc, dict):
        return []
    found = [doc.get(key) for key in ("config", "subject")]
    for key in ("layers", "manifests", "blobs"):
        if isinstance(doc.get(key), list):
            found.extend(doc[key])
    return [d for d in found if isinstance(d, dict)]


def referenced_digests(body: bytes) -> list[str]:
    """Digests a manifest or index points at: its descriptors' and schema1's `fsLayers` blob sums.

    Anything that is not a well-formed sha256 digest is left out, so the result is safe to
    build paths from.
    """
    doc = _parse(body)
    found: list[object] = [d.get("digest") for d in descriptors(doc)]
    if isinstance(doc, dict) and isinstance(doc.get("fsLayers"), list):
        found.extend(d.get("blobSum") for d in doc["fsLayers"] if isinstance(d, dict))
    unique = dict.fromkeys(d for d in found if isinstance(d, str) and SHA256_RE.fullmatch(d))
    return list(unique)


def descriptor_sizes(body: bytes) -> dict[str, int]:
    """digest → size of every descriptor in a manifest or index; descriptors without a valid
    sha256 digest or a size are skipped. Schema1 manifests carry no sizes."""
    sizes: dict[str, int] = {}
    for d in descriptors(_parse(body)):
        digest, size = d.get("digest"), d.get("size")
        if isinstance(digest, str) and SHA256_RE.fullmatch(digest) and type(size) is int and size >= 0:
            sizes.setdefault(digest, size)
    return sizes


def image_blobs(doc: dict[str, object]) -> list[str]:
    """The blobs an image manifest needs: config and layers, or schema1's blob sums."""
    descriptors = [doc.get("config"), *(doc.get("layers") or [])]  # type: ignore[misc]
    found = [d.get("digest") for d in descriptors if isinstance(d, dict)]
    found += [d.get("blobSum") for d in doc.get("fsLayers") or [] if isinstance(d, dict)]  # type: ignore[union-attr]
    return list(dict.fromkeys(d for d in found if isinstance(d, str) and SHA256_RE.fullmatch(d)))
