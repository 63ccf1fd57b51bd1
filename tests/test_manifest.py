"""What a manifest's bytes say: digest (schema1's signed payload), media type, references."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mirror import manifest
from mirror.mediatypes import (
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, SCHEMA1, SCHEMA1_SIGNED,
)
from tests.fakes.schema1 import payload_digest, sign

REAL_SIGNED = (Path(__file__).parent / "data" / "schema1-signed.json").read_bytes()
REAL_SIGNED_DIGEST = "sha256:bff08d8da5a030fc39fdfcddd533fac4bc76d877d1a33bc336f8115e18d9081b"
LAYER = "sha256:" + "a" * 64
CONFIG = "sha256:" + "c" * 64
GENERIC = ["text/plain", "application/json", "application/octet-stream", "binary/octet-stream", "", None]


def _schema1_payload(**extra: object) -> bytes:
    return json.dumps({"schemaVersion": 1, "name": "a/b", "tag": "1", "architecture": "amd64",
                       "fsLayers": [{"blobSum": LAYER}], "history": [{"v1Compatibility": "{}"}], **extra},
                      indent=3).encode()


def test_kind4_a_real_libtrust_signed_manifest_is_digested_over_its_payload() -> None:
    assert manifest.digest_of(REAL_SIGNED) == REAL_SIGNED_DIGEST
    assert manifest.media_type_of(REAL_SIGNED, "text/plain") == SCHEMA1_SIGNED


@pytest.mark.parametrize("signatures", [1, 2])
def test_kind4_signed_schema1_digest_covers_the_payload(signatures: int) -> None:
    payload = _schema1_payload()
    body = sign(payload, signatures=signatures)
    assert manifest.digest_of(body) == payload_digest(payload)
    assert manifest.digest_of(body) != "sha256:" + hashlib.sha256(body).hexdigest()


def test_kind4_unsigned_schema1_is_digested_as_it_is() -> None:
    payload = _schema1_payload()
    assert manifest.digest_of(payload) == payload_digest(payload)
    assert manifest.media_type_of(payload, "application/json") == SCHEMA1


@pytest.mark.parametrize("tamper", [
    lambda b: b.replace(b'"architecture": "amd64"', b'"architecture": "arm64"'),  # payload changed
    lambda b: b.replace(b'"alg": "ES256"', b'"alg": "ES384"'),  # algorithm swapped
    lambda b: b.replace(b'"alg": "ES256"', b'"alg": "none"'),
    lambda b: b.replace(b'"protected": "', b'"protected": "x'),  # header garbled
    lambda b: b.replace(b'"signatures": [', b'"signatures": [], "x": ['),
    lambda b: b.replace(b'"jwk": {', b'"jwk": {"kty": "oct", "k": "AA"}, "x": {'),
])
def test_kind4_a_tampered_or_malformed_signature_is_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    body = tamper(sign(_schema1_payload()))
    with pytest.raises(manifest.InvalidManifest):
        manifest.digest_of(body)


def test_kind4_signatures_that_disagree_on_the_payload_are_refused() -> None:
    one, other = sign(_schema1_payload()), sign(_schema1_payload(tag="2"))
    a, b = json.loads(one), json.loads(other)
    a["signatures"].append(b["signatures"][0])
    mixed = one[:one.index(b'"signatures"')] + b'"signatures": ' + json.dumps(a["signatures"]).encode() + b"\n}"
    with pytest.raises(manifest.InvalidManifest):
        manifest.digest_of(mixed)


def test_kind4_schema1_blob_sums_are_referenced() -> None:
    assert manifest.referenced_digests(REAL_SIGNED) == [
        "sha256:b2c5513bd934a7efb412c0dd965600b8cb00575b585eaff1cb980b69037fe6cd",
        "sha256:2dde6f11a89463bf20dba3b47d8b3b6de7cdcc19e50634e95a18dd95c278768d",
    ]
    assert manifest.image_blobs(json.loads(REAL_SIGNED)) == manifest.referenced_digests(REAL_SIGNED)


def _image(media_type: str | None) -> bytes:
    doc: dict[str, object] = {"schemaVersion": 2, "config": {"digest": CONFIG, "size": 1},
                              "layers": [{"digest": LAYER, "size": 1}]}
    if media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


def _index(media_type: str | None) -> bytes:
    doc: dict[str, object] = {"schemaVersion": 2, "manifests": [{"digest": LAYER, "size": 1}]}
    if media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


@pytest.mark.parametrize("sent", GENERIC)
@pytest.mark.parametrize("body, expected", [
    (_image(DOCKER_MANIFEST), DOCKER_MANIFEST),
    (_image(OCI_MANIFEST), OCI_MANIFEST),
    (_image(None), OCI_MANIFEST),  # OCI leaves the field optional
    (_index(DOCKER_LIST), DOCKER_LIST),
    (_index(OCI_INDEX), OCI_INDEX),
    (_index(None), OCI_INDEX),
    (REAL_SIGNED, SCHEMA1_SIGNED),
    (_schema1_payload(), SCHEMA1),
])
def test_kind3_a_generic_content_type_gives_way_to_the_body(sent: str | None, body: bytes, expected: str) -> None:
    assert manifest.media_type_of(body, sent) == expected


def test_kind3_upstreams_manifest_type_is_kept() -> None:
    assert manifest.media_type_of(_index(None), DOCKER_LIST) == DOCKER_LIST


@pytest.mark.parametrize("body", [
    b"<html>Access Denied</html>", b"", b"[]", b'"text"', b"{}", b'{"schemaVersion": 3}',
    b'{"schemaVersion": 2}', b'{"schemaVersion": 2, "mediaType": "text/html", "manifests": []}',
    b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
])
def test_kind3_bytes_that_are_no_manifest_have_no_media_type(body: bytes) -> None:
    assert manifest.media_type_of(body, "application/octet-stream") is None
