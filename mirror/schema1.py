"""Signed Docker schema1 manifests (`application/vnd.docker.distribution.manifest.v1+prettyjws`).

A signed schema1 manifest is a JSON document with a `signatures` block spliced in
before its closing brace (libtrust's "pretty" JWS). Its digest covers the payload:
the document as it was before signing. Every signature's protected header says how
to get it back: the first `formatLength` bytes of the document followed by the
base64url-decoded `formatTail`. Like distribution (`schema1.Verify`, libtrust), the
payload is accepted only when every signature agrees on it and verifies against the
key in its header (a `jwk`, or the first certificate of an `x5c` chain).

Source: github.com/docker/libtrust jsonsign.go (`ParsePrettySignature`, `Verify`).
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_SIGNATURES = 16  # real manifests carry one; a bound keeps bad input cheap

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class InvalidSchema1(ValueError):
    """The document is not a well-formed, correctly signed schema1 manifest."""


def is_signed(doc: object) -> bool:
    """Whether a parsed manifest is schema1 with a signatures block."""
    return isinstance(doc, dict) and doc.get("schemaVersion") == 1 and "signatures" in doc


def payload(body: bytes) -> bytes:
    """The signed payload of a pretty-JWS schema1 manifest: the bytes its digest covers.

    Raises InvalidSchema1 when the signatures are missing, disagree, or do not verify.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidSchema1("not JSON") from None
    signatures = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(signatures, list) or not signatures or len(signatures) > MAX_SIGNATURES:
        raise InvalidSchema1(f"expected 1 to {MAX_SIGNATURES} signatures")
    found: bytes | None = None
    for signature in signatures:
        protected, header = _protected(signature)
        length, tail = header.get("formatLength"), header.get("formatTail")
        if not isinstance(length, int) or not isinstance(tail, str) or not 0 < length <= len(body):
            raise InvalidSchema1("protected header without a usable formatLength and formatTail")
        candidate = body[:length] + _b64(tail)
        if found is not None and candidate != found:
            raise InvalidSchema1("signatures disagree on the payload")
        found = candidate
        _verify(signature, protected, candidate)
    assert found is not None
    return found


def _protected(signature: object) -> tuple[str, dict[str, Any]]:
    protected = signature.get("protected") if isinstance(signature, dict) else None
    if not isinstance(protected, str):
        raise InvalidSchema1("a signature has no protected header")
    try:
        header = json.loads(_b64(protected))
    except ValueError:
        raise InvalidSchema1("a protected header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise InvalidSchema1("a protected header is not a JSON object")
    return protected, header


def _verify(signature: dict[str, Any], protected: str, signed_payload: bytes) -> None:
    """Check one JWS signature (RFC 7515) over `protected.base64url(payload)`."""
    header = signature.get("header")
    if not isinstance(header, dict) or not isinstance(signature.get("signature"), str):
        raise InvalidSchema1("a signature has no header or value")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg[:2] not in ("ES", "RS") or alg[2:] not in _HASHES:
        raise InvalidSchema1(f"unsupported signature algorithm {str(alg)[:20]!r}")
    key = _public_key(header)
    message = f"{protected}.{base64.urlsafe_b64encode(signed_payload).rstrip(b'=').decode()}".encode()
    raw = _b64(signature["signature"])
    algorithm = _HASHES[alg[2:]]()
    try:
        if alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(raw) // 2
            der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
            key.verify(der, message, ec.ECDSA(algorithm))
        elif alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, message, padding.PKCS1v15(), algorithm)
        else:
            raise InvalidSchema1(f"{alg} does not match the signing key's type")
    except InvalidSignature:
        raise InvalidSchema1("a signature does not verify") from None


def _public_key(header: dict[str, Any]) -> PublicKey:
    """The key a signature names: a JWK (RFC 7517), or the leaf of an `x5c` chain."""
    try:
        if isinstance(jwk := header.get("jwk"), dict):
            if jwk.get("kty") == "EC" and jwk.get("crv") in _CURVES:
                numbers = ec.EllipticCurvePublicNumbers(
                    _int(jwk["x"]), _int(jwk["y"]), _CURVES[jwk["crv"]]())
                return numbers.public_key()
            if jwk.get("kty") == "RSA":
                return rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
        elif isinstance(chain := header.get("x5c"), list) and chain and isinstance(chain[0], str):
            key = x509.load_der_x509_certificate(base64.b64decode(chain[0])).public_key()
            if isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
                return key
    except (KeyError, TypeError, ValueError):
        pass
    raise InvalidSchema1("a signature names no usable public key")


def _int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    return int.from_bytes(_b64(value), "big")


def _b64(text: str) -> bytes:
    """base64url without padding, as JOSE writes it."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSchema1("bad base64url") from None
