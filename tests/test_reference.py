"""Names, tags and digests (distribution's grammar)."""
from __future__ import annotations

import pytest

from mirror.errors import RegistryError
from mirror.reference import ManifestRef, parse_digest, parse_name, parse_reference

SHA = "sha256:" + "0123456789abcdef" * 4


def _refused(call, *args: object) -> RegistryError:  # type: ignore[no-untyped-def]
    with pytest.raises(RegistryError) as info:
        call(*args)
    return info.value


@pytest.mark.parametrize("name", [
    "alpine", "library/alpine", "a", "0", "org/team/app", "my-app", "my--app", "my_app", "my__app", "my.app",
    "a1/b2.c3/d-e_f", "x" * 255,
])
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", [
    "Alpine", "library/Alpine", "", "/alpine", "alpine/", "a//b", "-a", "_a", ".a", "a-", "a.", "a___b", "a..b",
    "..", "a/../b", "../etc", "a/./b", "a b", "a\x00b", "a\nb", "a:b", "a@b", "é", "x" * 256,
])
def test_invalid_names(name: str) -> None:
    err = _refused(parse_name, name)
    assert (err.code, err.status) == ("NAME_INVALID", 400)


def test_long_name_message_is_bounded() -> None:
    err = _refused(parse_name, "x" * 10_000)
    assert "longer than 255" in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "1.0-rc_1", "_x", "A", "a" * 128, "3.19.1-alpine3.19"])
def test_valid_tags(tag: str) -> None:
    assert parse_reference(tag) == ManifestRef(tag=tag)
    assert str(parse_reference(tag)) == tag


@pytest.mark.parametrize("tag", [".hidden", "-x", "", "a" * 129, "a/b", "a b", "a\x00b", "..", "tag!", "é"])
def test_invalid_tags(tag: str) -> None:
    err = _refused(parse_reference, tag)
    assert (err.code, err.status) == ("TAG_INVALID", 400)


def test_invalid_tag_message_is_bounded() -> None:
    assert len(_refused(parse_reference, "t" * 50_000).message) < 300


def test_digest_reference() -> None:
    assert parse_reference(SHA) == ManifestRef(digest=SHA)
    assert parse_digest(SHA) == SHA


def test_sha512_is_valid_but_unsupported() -> None:
    err = _refused(parse_digest, "sha512:" + "ab" * 64)
    assert (err.code, err.status) == ("DIGEST_INVALID", 400)
    assert "only sha256 digests are supported" in err.message
    assert _refused(parse_reference, "sha512:" + "ab" * 64).code == "DIGEST_INVALID"


@pytest.mark.parametrize("digest", [
    "sha256:abc",  # short
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "A" * 64,  # uppercase hex
    "sha256:" + "g" * 64,
    "sha256:../../etc",
    "sha256:../../etc/passwd" + "a" * 48,
    "sha256:" + "a" * 64 + "\n",
    "sha256:" + "a" * 64 + "\x00",
    "sha256:" + "a" * 64 + "/..",
    "SHA256:" + "a" * 64,
    "sha256" + "a" * 64,
    ":" + "a" * 64,
    "sha256:",
    "",
])
def test_invalid_digests(digest: str) -> None:
    err = _refused(parse_digest, digest)
    assert (err.code, err.status) == ("DIGEST_INVALID", 400)
    assert "expected sha256: followed by 64 lowercase hex digits" in err.message
