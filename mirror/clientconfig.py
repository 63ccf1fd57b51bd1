"""Client configuration for this mirror: containerd hosts.toml, Docker daemon.json, podman registries.conf.

Each function returns {relative file path: content}, so the CLI can print the
files or write them under a directory. How each client reaches a registry
through the mirror:

- containerd: one `certs.d/<registry>/hosts.toml` per registry; containerd adds
  `?ns=<registry>` to every request, which tells the mirror the upstream.
- podman (and CRI-O, skopeo, buildah): a `[[registry.mirror]]` whose location
  carries the registry as a path prefix, `mirror:5000/ghcr.io`, which the mirror
  routes by (`/v2/ghcr.io/<repo>/…`).
- Docker: `registry-mirrors` applies to Docker Hub only; other registries are
  pulled by path (`mirror:5000/ghcr.io/org/img:tag`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

# Where clients go when the mirror does not answer (containerd's `server`).
REGISTRY_SERVERS = {"docker.io": "https://registry-1.docker.io"}
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
CLIENTS = ("containerd", "docker", "podman")


class ClientConfigError(ValueError):
    """A URL or registry name that cannot make a working client configuration."""


@dataclass(frozen=True)
class MirrorURL:
    """The mirror as clients reach it: `scheme://host[:port]`, nothing after."""

    scheme: str
    netloc: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def insecure(self) -> bool:
        return self.scheme == "http"


def parse_mirror_url(url: str) -> MirrorURL:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientConfigError(f"expected the mirror's URL, such as http://mirror.internal:5000, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ClientConfigError(f"the mirror's URL has no path, query or credentials: {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ClientConfigError(f"bad port in {url!r}: {exc}") from None
    return MirrorURL(parts.scheme, parts.netloc.lower())


def registry_server(registry: str) -> str:
    return REGISTRY_SERVERS.get(registry, f"https://{registry}")


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


def containerd(url: str, registries: Iterable[str]) -> dict[str, str]:
    """`<registry>/hosts.toml` for each registry (put them under /etc/containerd/certs.d/)."""
    mirror = parse_mirror_url(url)
    files = {}
    for registry in registries:
        lines = [
            f"# containerd: pull {registry} images through the mirror at {mirror.url}",
            f"server = {_toml_string(registry_server(registry))}",
            "",
            f"[host.{_toml_string(mirror.url)}]",
            '  capabilities = ["pull", "resolve"]',
        ]
        if mirror.scheme == "https":
            lines.append("  # ca = \"/etc/containerd/certs.d/mirror-ca.crt\"   # if its certificate is not publicly trusted")
        files[f"{registry}/hosts.toml"] = "\n".join(lines) + "\n"
    return files


def docker(url: str, registries: Iterable[str] = ("docker.io",)) -> tuple[dict[str, str], list[str]]:
    """`daemon.json` (for /etc/docker/), and notes for the user about what it cannot do."""
    mirror = parse_mirror_url(url)
    config: dict[str, list[str]] = {"registry-mirrors": [mirror.url]}
    if mirror.insecure:
        config["insecure-registries"] = [mirror.netloc]
    notes = ["Docker uses registry-mirrors for Docker Hub (docker.io) images only; "
             f"pull other registries by path, e.g. {mirror.netloc}/ghcr.io/org/image:tag"]
    others = [r for r in registries if r not in DOCKER_HUB_ALIASES]
    if others:
        notes.append(f"not configurable in daemon.json, pull by path instead: {', '.join(others)}")
    notes.append("merge into /etc/docker/daemon.json, then restart (or reload) dockerd")
    return {"daemon.json": json.dumps(config, indent=2) + "\n"}, notes


def podman(url: str, registries: Iterable[str]) -> dict[str, str]:
    """`registries.conf` (for /etc/containers/registries.conf.d/ or ~/.config/containers/)."""
    mirror = parse_mirror_url(url)
    blocks = [f"# podman, CRI-O, skopeo, buildah: pull through the mirror at {mirror.url}"]
    for registry in registries:
        block = [
            "[[registry]]",
            f"prefix = {_toml_string(registry)}",
            f"location = {_toml_string(registry)}",
            "",
            "[[registry.mirror]]",
            f"location = {_toml_string(f'{mirror.netloc}/{registry}')}",
        ]
        if mirror.insecure:
            block.append("insecure = true")
        blocks.append("\n".join(block))
    return {"registries.conf": "\n\n".join(blocks) + "\n"}


def check_registries(registries: Iterable[str], served: Iterable[str]) -> list[str]:
    """The registries, validated against those the mirror serves (it refuses any other)."""
    served = list(served)
    chosen = []
    for registry in registries:
        name = registry.strip().lower()
        name = "docker.io" if name in DOCKER_HUB_ALIASES else name
        if name not in served:
            raise ClientConfigError(
                f"the mirror does not serve {registry!r} (it serves: {', '.join(served)}); "
                "add it under [upstreams] and pass that file with --config"
            )
        if name not in chosen:
            chosen.append(name)
    return chosen
