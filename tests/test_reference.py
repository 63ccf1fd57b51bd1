"""Names, tags and digests (distribution's grammar), and which upstream a request goes to."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mirror.errors import RegistryError
from mirror.reference import ManifestRef, parse_digest, parse_name, parse_reference
from mirror.routing import Router

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


# ---- routing ----------------------------------------------------------------------------------

def _router(*names: str, default: str = "docker.io") -> Router:
    upstreams = {n: SimpleNamespace(name=n) for n in names or ("docker.io", "ghcr.io", "quay.io")}
    return Router(upstreams, default)  # type: ignore[arg-type]


def _route(name: str, ns: str | None = None, router: Router | None = None) -> tuple[str, str]:
    upstream, repo = (router or _router()).route(name, ns)
    return upstream.name, repo


@pytest.mark.parametrize(("name", "ns", "want"), [
    ("alpine", None, ("docker.io", "library/alpine")),
    ("library/alpine", None, ("docker.io", "library/alpine")),
    ("bitnami/redis", None, ("docker.io", "bitnami/redis")),
    ("docker.io/alpine", None, ("docker.io", "library/alpine")),
    ("index.docker.io/alpine", None, ("docker.io", "library/alpine")),
    ("registry-1.docker.io/grafana/grafana", None, ("docker.io", "grafana/grafana")),
    ("ghcr.io/org/img", None, ("ghcr.io", "org/img")),
    ("ghcr.io/img", None, ("ghcr.io", "img")),  # library/ is docker.io's alone
    ("quay.io/a/b/c", None, ("quay.io", "a/b/c")),
    ("ghcr.io", None, ("docker.io", "library/ghcr.io")),  # one component is a repository, not a host
    ("my.org", None, ("docker.io", "library/my.org")),
    ("org/img", "ghcr.io", ("ghcr.io", "org/img")),
    ("alpine", "docker.io", ("docker.io", "library/alpine")),
    ("alpine", "index.docker.io", ("docker.io", "library/alpine")),
    ("ghcr.io/org/img", "quay.io", ("quay.io", "ghcr.io/org/img")),  # with ns, the name is taken as it is
])
def test_route(name: str, ns: str | None, want: tuple[str, str]) -> None:
    assert _route(name, ns) == want


def test_default_upstream_other_than_docker_io() -> None:
    router = _router("ghcr.io", "docker.io", default="ghcr.io")
    assert _route("img", router=router) == ("ghcr.io", "img")
    assert _route("docker.io/img", router=router) == ("docker.io", "library/img")


@pytest.mark.parametrize(("name", "ns", "host"), [
    ("evil.example.com/x/y", None, "evil.example.com"),
    ("localhost/x", None, "localhost"),
    ("x/y", "evil.example.com", "evil.example.com"),
    ("x", "gcr.io", "gcr.io"),  # a built-in default, but not configured here
])
def test_unknown_registry_is_refused(name: str, ns: str | None, host: str) -> None:
    err = _refused(_router().route, name, ns)
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert f"{host!r} is not mirrored here (configured: docker.io, ghcr.io, quay.io)" in err.message


@pytest.mark.parametrize("ns", [
    "ghcr.io:443", "ghcr.io/org", "https://ghcr.io", "//ghcr.io", "GHCR.IO", "", "-ghcr.io", "ghcr..io",
    "ghcr.io.", "a" * 254, "ghcr.io\x00", "ghcr.io?x=1", "user@ghcr.io",
])
def test_ns_that_is_not_a_host_name_is_400(ns: str) -> None:
    err = _refused(_router().route, "org/img", ns)
    assert (err.code, err.status) == ("NAME_INVALID", 400)
    assert "invalid ns=" in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize("name", ["Org/img", "ghcr.io/../etc", "ghcr.io//x", "../etc"])
def test_invalid_name_is_refused_before_routing(name: str) -> None:
    assert _refused(_router().route, name, None).code == "NAME_INVALID"


def test_library_prefix_cannot_push_a_name_past_the_limit() -> None:
    name = "x" * 250  # valid alone; "library/" + name is 258 characters
    assert parse_name(name) == name
    err = _refused(_router().route, name, None)
    assert err.code == "NAME_INVALID"
