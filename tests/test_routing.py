"""Which upstream a request goes to: `?ns=`, a path prefix, both (containerd's override_path), or the default."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mirror.errors import RegistryError
from mirror.reference import parse_name
from mirror.routing import Router


def _refused(call, *args: object) -> RegistryError:  # type: ignore[no-untyped-def]
    with pytest.raises(RegistryError) as info:
        call(*args)
    return info.value


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
    ("my.org/img", "quay.io", ("quay.io", "my.org/img")),  # not an upstream: a name at quay.io, as it is
])
def test_route(name: str, ns: str | None, want: tuple[str, str]) -> None:
    assert _route(name, ns) == want


@pytest.mark.parametrize(("name", "ns", "want"), [
    # containerd 1.7, host "http://mirror:5000/v2/docker.io" with override_path = true
    ("docker.io/library/small", "docker.io", ("docker.io", "library/small")),
    ("docker.io/small", "docker.io", ("docker.io", "library/small")),
    ("ghcr.io/org/app", "ghcr.io", ("ghcr.io", "org/app")),
    ("quay.io/a/b/c", "quay.io", ("quay.io", "a/b/c")),
    # ns and prefix in any case, with the default port, by alias
    ("docker.io/library/small", "DOCKER.IO", ("docker.io", "library/small")),
    ("docker.io/library/small", "docker.io:443", ("docker.io", "library/small")),
    ("docker.io/library/small", "index.docker.io", ("docker.io", "library/small")),
    ("docker.io/library/small", "registry-1.docker.io:443", ("docker.io", "library/small")),
    ("index.docker.io/library/small", "docker.io", ("docker.io", "library/small")),
    ("registry-1.docker.io/library/small", "Registry-1.Docker.IO", ("docker.io", "library/small")),
    ("Docker.IO/library/small", "docker.io", ("docker.io", "library/small")),
    ("ghcr.io:443/org/app", "ghcr.io", ("ghcr.io", "org/app")),
    ("GHCR.IO/org/app", None, ("ghcr.io", "org/app")),
    ("ghcr.io:443/org/app", None, ("ghcr.io", "org/app")),
])
def test_kind11_override_path_prefix_with_ns(name: str, ns: str | None, want: tuple[str, str]) -> None:
    assert _route(name, ns) == want


@pytest.mark.parametrize(("ns", "want"), [
    ("docker.io:443", "docker.io"), ("ghcr.io:443", "ghcr.io"), ("GHCR.IO", "ghcr.io"), ("Quay.Io:443", "quay.io"),
    ("index.docker.io:443", "docker.io"), ("REGISTRY-1.DOCKER.IO", "docker.io"),
])
def test_kind11_ns_is_a_host_name_in_any_case_with_or_without_default_port(ns: str, want: str) -> None:
    assert _route("org/app", ns) == (want, "org/app")


def test_kind11_a_configured_name_with_a_port_is_kept() -> None:
    router = _router("docker.io", "registry.local:5000")
    assert _route("app", "registry.local:5000", router) == ("registry.local:5000", "app")
    assert _route("registry.local:5000/team/app", "registry.local:5000", router) == ("registry.local:5000", "team/app")
    assert _refused(router.route, "app", "registry.local:5001").status == 404


@pytest.mark.parametrize(("name", "ns"), [
    ("docker.io/library/small", "ghcr.io"),
    ("ghcr.io/org/app", "docker.io"),
    ("ghcr.io/org/app", "quay.io:443"),
    ("index.docker.io/library/small", "quay.io"),
])
def test_kind11_prefix_and_ns_that_disagree_are_400(name: str, ns: str) -> None:
    err = _refused(_router().route, name, ns)
    assert (err.code, err.status) == ("NAME_INVALID", 400)
    assert "but ns=" in err.message and "override_path" in err.message


@pytest.mark.parametrize("name", ["evil.example.com/x/y", "my.org/img", "localhost/x", "localhost:5000/x"])
def test_kind11_with_ns_docker_io_a_leading_host_is_never_a_repository(name: str) -> None:
    """Docker Hub names have no `.`, `:` or `localhost` first component: that is a host, not mirrored here."""
    err = _refused(_router().route, name, "docker.io")
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert "is not mirrored here" in err.message


def test_default_upstream_other_than_docker_io() -> None:
    router = _router("ghcr.io", "docker.io", default="ghcr.io")
    assert _route("img", router=router) == ("ghcr.io", "img")
    assert _route("docker.io/img", router=router) == ("docker.io", "library/img")


@pytest.mark.parametrize(("name", "ns", "host"), [
    ("evil.example.com/x/y", None, "evil.example.com"),
    ("localhost/x", None, "localhost"),
    ("x/y", "evil.example.com", "evil.example.com"),
    ("x", "gcr.io", "gcr.io"),  # a built-in default, but not configured here
    ("x", "127.0.0.1", "127.0.0.1"),
])
def test_unknown_registry_is_refused(name: str, ns: str | None, host: str) -> None:
    err = _refused(_router().route, name, ns)
    assert (err.code, err.status) == ("NAME_UNKNOWN", 404)
    assert f"{host!r} is not mirrored here (configured: docker.io, ghcr.io, quay.io)" in err.message


@pytest.mark.parametrize("ns", [
    "ghcr.io/org", "https://ghcr.io", "//ghcr.io", "", "-ghcr.io", "ghcr..io", "ghcr.io:", "ghcr.io:443:443",
    "ghcr.io:123456", "ghcr.io.", "a" * 254, "ghcr.io\x00", "ghcr.io?x=1", "user@ghcr.io", "[::1]:443", "ghcr io",
])
def test_ns_that_is_not_a_host_name_is_400(ns: str) -> None:
    err = _refused(_router().route, "org/img", ns)
    assert (err.code, err.status) == ("NAME_INVALID", 400)
    assert "invalid ns=" in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize("name", ["Org/img", "ghcr.io/../etc", "ghcr.io//x", "../etc", "ghcr.io/Org/img"])
def test_invalid_name_is_refused_before_routing(name: str) -> None:
    assert _refused(_router().route, name, None).code == "NAME_INVALID"
    assert _refused(_router().route, name, "ghcr.io").code == "NAME_INVALID"


def test_library_prefix_cannot_push_a_name_past_the_limit() -> None:
    name = "x" * 250  # valid alone; "library/" + name is 258 characters
    assert parse_name(name) == name
    err = _refused(_router().route, name, None)
    assert err.code == "NAME_INVALID"
