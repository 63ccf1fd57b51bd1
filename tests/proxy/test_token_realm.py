"""Mirror tokens: sealed grants any worker (or a restarted mirror) holding the key can read, and
nobody can forge or stretch."""
from __future__ import annotations

import os

from cryptography.fernet import Fernet

from mirror.proxy.token_realm import REFRESH_TTL, TOKEN_TTL, Grant, TokenService
from tests.credentials import FINGERPRINTS, creds


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def service(clock: Clock, key: bytes | None = None) -> TokenService:
    return TokenService(key or os.urandom(32), FINGERPRINTS, clock)


def test_a_token_issued_by_one_worker_is_read_by_another_with_the_same_key() -> None:
    key = os.urandom(32)
    clock = Clock()
    issued = service(clock, key).issue(Grant(creds("alice", "s3cret")), offline=True)
    other = service(clock, key)
    got = other.resolve(str(issued["token"]))
    assert got == Grant(creds("alice", "s3cret"))
    assert got is not None and got.credentials is not None
    assert got.credentials.fingerprint == creds("alice", "s3cret").fingerprint
    assert other.refresh(str(issued["refresh_token"])) == Grant(creds("alice", "s3cret"))
    assert service(clock).resolve(str(issued["token"])) is None  # another data directory's key


def test_tokens_expire_and_each_kind_is_used_only_for_its_purpose() -> None:
    clock = Clock()
    tokens = service(clock)
    issued = tokens.issue(Grant(creds("bob-the-builder", "s3cret-passw0rd")), offline=True)
    access, refresh = str(issued["access_token"]), str(issued["refresh_token"])
    assert tokens.refresh(access) is None and tokens.resolve(refresh) is None
    # sealed, not merely encoded (strings long enough never to turn up in random base64 by chance)
    assert "s3cret-passw0rd" not in access and "bob-the-builder" not in access
    clock.now += TOKEN_TTL - 1
    assert tokens.resolve(access) is not None  # remembered from here on ...
    clock.now += 2
    assert tokens.resolve(access) is None  # ... but never past its lifetime
    assert tokens.refresh(refresh) is not None
    clock.now += REFRESH_TTL
    assert tokens.refresh(refresh) is None


def test_anonymous_grants_and_tampered_or_foreign_tokens() -> None:
    tokens = service(Clock())
    anonymous = str(tokens.issue(Grant(None))["token"])
    assert tokens.resolve(anonymous) == Grant(None)
    assert "refresh_token" not in tokens.issue(Grant(None), offline=True)
    tampered = anonymous[:-6] + ("AAAAAA" if not anonymous.endswith("AAAAAA") else "BBBBBB")
    for bad in (tampered, "", "not-a-token", "é" * 40, Fernet(Fernet.generate_key()).encrypt(b"{}").decode()):
        assert tokens.resolve(bad) is None
