"""Which upstream serves a request, and the repository name there.

Three ways to name an upstream: containerd's `?ns=<host>`, a path prefix
(`/v2/ghcr.io/org/img/...`), or nothing (the default upstream). containerd's
`override_path = true` with a host like `http://mirror:5000/v2/docker.io` sends
both at once (`/v2/docker.io/library/x/...?ns=docker.io`); they must agree.
Only configured upstreams are ever contacted: the mirror is never an open proxy.
"""
from __future__ import annotations

import re
from typing import Generic, Mapping, Protocol, TypeVar

from mirror.errors import RegistryError
from mirror.reference import parse_name

ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}
DEFAULT_PORT = "443"  # registries are HTTPS: `ghcr.io:443` is `ghcr.io`
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?")
HOST_MAX = 253


def is_host(component: str) -> bool:
    """Distribution's rule: a first name component with a `.` or `:`, or `localhost`, is a host
    (Docker Hub names have neither); it must also be shaped like one: `name[:port]`, any case."""
    looks = "." in component or ":" in component or component.lower() == "localhost"
    return looks and len(component) <= HOST_MAX and _HOST_RE.fullmatch(component.lower()) is not None


class Named(Protocol):
    @property
    def name(self) -> str: ...


Upstream = TypeVar("Upstream", bound=Named)


class Router(Generic[Upstream]):
    """Routes requests to upstreams: any objects with a `name` (the upstream clients, in the app)."""

    def __init__(self, upstreams: Mapping[str, Upstream], default: str) -> None:
        self.upstreams = upstreams
        self.default = upstreams[default]

    def _canonical(self, host: str) -> str:
        """The configured name `host` stands for: lowercase, aliases resolved, default port dropped."""
        host = host.lower()
        if host not in self.upstreams and host.endswith(f":{DEFAULT_PORT}"):
            host = host.removesuffix(f":{DEFAULT_PORT}")
        return ALIASES.get(host, host)

    def _named(self, host: str) -> Upstream:
        upstream = self.upstreams.get(self._canonical(host))
        if upstream is None:
            raise RegistryError(
                "NAME_UNKNOWN", 404,
                f"registry {host[:100]!r} is not mirrored here (configured: {', '.join(self.upstreams)})",
            )
        return upstream

    def route_ns(self, ns: str) -> Upstream:
        """The upstream containerd names with `?ns=<host>[:port]` (any case, aliases too).

        Raises NAME_INVALID (400) for something that is not a host name, NAME_UNKNOWN (404)
        for a host that is not configured.
        """
        if len(ns) > HOST_MAX or not _HOST_RE.fullmatch(ns.lower()):
            raise RegistryError(
                "NAME_INVALID", 400, f"invalid ns={ns[:100]!r}: expected a registry host name such as docker.io"
            )
        return self._named(ns)

    def route(self, name: str, ns: str | None) -> tuple[Upstream, str]:
        """(upstream, repository at that upstream) for a `/v2/<name>/...` request.

        A leading host component naming a configured upstream routes there, with or without
        `ns`; with an `ns` naming another upstream the request is refused (400 NAME_INVALID).
        A leading host that is not configured is refused (404 NAME_UNKNOWN), unless `ns` names
        an upstream other than docker.io (whose own names may look like that). Invalid names
        are 400 NAME_INVALID. docker.io repositories of one component get `library/`.
        """
        first, _, rest = name.partition("/")
        hosted = bool(rest) and is_host(first)
        if not hosted:
            parse_name(name)  # no host in front: the whole name is a repository name
        by_ns = self.route_ns(ns) if ns is not None else None
        by_prefix = self.upstreams.get(self._canonical(first)) if hosted else None
        if by_prefix is not None:
            if by_ns is not None and by_ns is not by_prefix:
                raise RegistryError(
                    "NAME_INVALID", 400,
                    f"the path names registry {first[:100]!r} but ns={ns!r} names {by_ns.name!r}:"
                    " with override_path, the host's path must end in /v2/<the ns registry>",
                )
            upstream, repo = by_prefix, rest
        elif hosted and (by_ns is None or by_ns.name == "docker.io"):
            # Docker Hub names never start with a host, so with ns=docker.io this is one too
            upstream, repo = self._named(first), rest
        else:
            upstream, repo = by_ns or self.default, name
        parse_name(repo)
        if upstream.name == "docker.io" and "/" not in repo:
            repo = f"library/{repo}"
        return upstream, parse_name(repo)
