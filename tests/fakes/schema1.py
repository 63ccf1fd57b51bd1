"""Signed Docker schema1 manifests as quay.io and old Docker Hub images still serve them.

`sign` writes libtrust's "pretty" JWS: the `signatures` block spliced in before the
payload's closing brace, each protected header carrying `formatLength` and
`formatTail` so the payload (whose sha256 is the manifest's digest) can be recovered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.fakes.registry import FakeRegistry, Manifest

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(payload: bytes, key: ec.EllipticCurvePrivateKey | None = None, signatures: int = 1) -> bytes:
    """`payload` (a JSON object) with `signatures` ES256 signatures, as libtrust writes them."""
    close = len(payload.rstrip()) - 1
    if payload[close:close + 1] != b"}":
        raise ValueError("payload must be a JSON object")
    format_length = len(payload[:close].rstrip())
    tail = payload[format_length:]
    blocks = []
    for _ in range(signatures):
        signer = key or ec.generate_private_key(ec.SECP256R1())
        protected = _b64url(json.dumps({"formatLength": format_length, "formatTail": _b64url(tail),
                                        "time": "2016-01-01T00:00:00Z"}).encode())
        der = signer.sign(f"{protected}.{_b64url(payload)}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        numbers = signer.public_key().public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _b64url(numbers.x.to_bytes(32, "big")),
               "y": _b64url(numbers.y.to_bytes(32, "big"))}
        blocks.append({"header": {"jwk": jwk, "alg": "ES256"},
                       "signature": _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
                       "protected": protected})
    signed = json.dumps(blocks, indent=3).replace("\n", "\n   ")
    return payload[:format_length] + b',\n   "signatures": ' + signed.encode() + tail


def manifest_payload(repo: str, tag: str, layers: list[str]) -> dict[str, object]:
    """An unsigned schema1 manifest for `layers` (base first), with the v1 history chain clients
    check: entry i's `parent` is entry i+1's `id`, newest first, as `fsLayers` are."""
    ids = [os.urandom(32).hex() for _ in layers]
    history = [{"id": ids[i], **({"parent": ids[i + 1]} if i + 1 < len(ids) else {}),
                **({"architecture": "amd64", "os": "linux"} if i == 0 else {})} for i in range(len(ids))]
    return {"schemaVersion": 1, "name": repo, "tag": tag, "architecture": "amd64",
            "fsLayers": [{"blobSum": d} for d in reversed(layers)],
            "history": [{"v1Compatibility": json.dumps(entry)} for entry in history]}


def payload_digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def add_schema1_image(registry: FakeRegistry, repo: str, tag: str | None, layers: int = 2,
                      signed: bool = True) -> Manifest:
    """Store layers and a schema1 manifest for them (signed: `…v1+prettyjws`) under `tag`."""
    digests = [registry.add_blob(repo, os.urandom(2048)) for _ in range(layers)]
    payload = json.dumps(manifest_payload(repo, tag or "latest", digests), indent=3).encode()
    body = sign(payload) if signed else payload
    media_type = SCHEMA1_SIGNED if signed else SCHEMA1
    digest = registry.add_manifest(repo, body, media_type, tag, digest=payload_digest(payload))
    return Manifest(digest, body, media_type)
