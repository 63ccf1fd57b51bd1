"""Repository names, tags and digests, validated with distribution's grammar.

Every path on disk is derived from a digest that passed `parse_digest`, so
nothing a client sends can name a file outside the data directory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import RegistryError, digest_invalid, name_invalid

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
NAME_MAX = 255


def parse_name(name: str) -> str:
    """Return `name` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > NAME_MAX:
        raise name_invalid(name[:64] + "…", f"longer than {NAME_MAX} characters")
    if not NAME_RE.fullmatch(name):
        raise name_invalid(name, "components must be lowercase letters, digits and separators . _ __ -")
    return name


def parse_digest(digest: str) -> str:
    """Return `digest` if it is a sha256 digest we can verify, else raise DIGEST_INVALID."""
    if SHA256_RE.fullmatch(digest):
        return digest
    if DIGEST_RE.fullmatch(digest) and not digest.startswith("sha256:"):
        raise digest_invalid(digest, "only sha256 digests are supported")
    raise digest_invalid(digest, "expected sha256: followed by 64 lowercase hex digits")


def is_digest(reference: str) -> bool:
    return ":" in reference


@dataclass(frozen=True)
class ManifestRef:
    """A manifest reference from a URL: exactly one of tag or digest is set."""

    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return self.digest or self.tag or ""


def parse_reference(reference: str) -> ManifestRef:
    """Parse the `<reference>` of `/v2/<name>/manifests/<reference>`."""
    if is_digest(reference):
        return ManifestRef(digest=parse_digest(reference))
    if not TAG_RE.fullmatch(reference):
        raise RegistryError(
            "TAG_INVALID", 400, f"invalid tag {reference[:140]!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        )
    return ManifestRef(tag=reference)
