"""Test doubles for the mirror's collaborators."""

from .registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Call,
    FakeRegistry,
    Image,
    Manifest,
    Token,
    digest_of,
)

__all__ = ["DOCKER_LIST", "DOCKER_MANIFEST", "OCI_INDEX", "OCI_MANIFEST", "Call", "FakeRegistry",
           "Image", "Manifest", "Token", "digest_of"]
