"""Which upstream serves a request, and the repository name there.

Three ways to name an upstream: containerd's `?ns=<host>`, a path prefix
(`/v2/ghcr.io/org/img/...`), or nothing (the default upstream). Only configured
upstreams are ever contacted: the mirror is never an open proxy.
"""
from __future__ import annotations

import re
from typing import Mapping

from mirror.errors import RegistryError
from mirror.reference import parse_name
from mirror.upstream.client import Upstream

ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class Router:
    def __init__(self, upstreams: Mapping[str, Upstream], default: str) -> None:
        self.upstreams = upstreams
        self.default = upstreams[default]

    def _named(self, host: str) -> Upstream:
        upstream = self.upstreams.get(ALIASES.get(host, host))
        if upstream is None:
            raise RegistryError(
                "NAME_UNKNOWN", 404,
                f"registry {host!r} is not mirrored here (configured: {', '.join(self.upstreams)})",
            )
        return upstream

    def route_ns(self, ns: str) -> Upstream:
        """The upstream containerd names with `?ns=<host>`."""
        if not _HOST_RE.fullmatch(ns) or len(ns) > 253:
            raise RegistryError(
                "NAME_INVALID", 400, f"invalid ns={ns[:100]!r}: expected a registry host name such as docker.io"
            )
        return self._named(ns)

    def route(self, name: str, ns: str | None) -> tuple[Upstream, str]:
        """(upstream, repository at that upstream) for a `/v2/<name>/...` request."""
        parse_name(name)
        if ns is not None:
            upstream, repo = self.route_ns(ns), name
        else:
            first, _, rest = name.partition("/")
            if rest and ("." in first or first == "localhost"):
                upstream, repo = self._named(first), rest
            else:
                upstream, repo = self.default, name
        if upstream.name == "docker.io" and "/" not in repo:
            repo = f"library/{repo}"
        return upstream, parse_name(repo)
