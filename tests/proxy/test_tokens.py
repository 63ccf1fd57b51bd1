"""Mirror tokens: sealed grants any worker holding the key can read, and nobody can forge or stretch."""
from __future__ import annotations

from cryptography.fernet import Fernet

from mirror.proxy.tokens import REFRESH_TTL, TOKEN_TTL, Grant, TokenService
from mirror.upstream.auth import Credentials


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_issued_by_one_worker_is_read_by_another_with_the_same_key() -> None:
    key = Fernet.generate_key()
    clock = Clock()
    issued = TokenService(clock, key).issue(Grant(Credentials("alice", "s3cret")), offline=True)
    other = TokenService(clock, key)
    assert other.resolve(str(issued["token"])) == Grant(Credentials("alice", "s3cret"))
    assert other.refresh(str(issued["refresh_token"])) == Grant(Credentials("alice", "s3cret"))
    assert TokenService(clock).resolve(str(issued["token"])) is None  # another key: a restart


def test_tokens_expire_and_each_kind_is_used_only_for_its_purpose() -> None:
    clock = Clock()
    tokens = TokenService(clock)
    issued = tokens.issue(Grant(Credentials("bob-the-builder", "s3cret-passw0rd")), offline=True)
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
    tokens = TokenService(Clock())
    anonymous = str(tokens.issue(Grant(None))["token"])
    assert tokens.resolve(anonymous) == Grant(None)
    assert "refresh_token" not in tokens.issue(Grant(None), offline=True)
    tampered = anonymous[:-6] + ("AAAAAA" if not anonymous.endswith("AAAAAA") else "BBBBBB")
    for bad in (tampered, "", "not-a-token", "é" * 40, Fernet(Fernet.generate_key()).encrypt(b"{}").decode()):
        assert tokens.resolve(bad) is None
