"""Build random, really unpackable images and push them to the upstream registry over its API.

Layers are gzip'd tars of random regular files written to a temporary file (memory stays flat
even for a 64 MiB+ layer); configs carry correct `rootfs.diff_ids`. Manifests are serialised
with indentation on purpose: a mirror that re-encodes JSON changes the digest and gets caught.

Synchronous on purpose: usable from session fixtures and sync tests alike, and safe inside an
async test because it only talks to the registry subprocess (the token is minted in-process).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import secrets
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import quote, urljoin, urlsplit

from tests.fakes import schema1
from tests.fakes.token_server import Scope
from tests.integration.registry import UpstreamRegistry

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

ImageKind = Literal["schema2", "oci", "list", "index"]

# Odd sizes on purpose: not a multiple of the upload chunk nor of the tar block.
BIG_LAYER_SIZE = 65 * 1024 * 1024 + 4097
UPLOAD_CHUNK = 8 * 1024 * 1024
PLATFORMS = ({"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux", "variant": "v8"})


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class PushedImage:
    """What was pushed. `blobs` are this manifest's own (config first, then layers; none for a
    list/index); `children` are the per-platform manifests of a list/index, pushed by digest."""

    repo: str
    tag: str | None
    digest: str
    media_type: str
    manifest: bytes
    blobs: tuple[Blob, ...]
    children: tuple[PushedImage, ...] = ()
    platform: str | None = None

    @property
    def reference(self) -> str:
        """`repo:tag`, or `repo@digest` for an untagged child."""
        return f"{self.repo}:{self.tag}" if self.tag else f"{self.repo}@{self.digest}"

    @property
    def all_blobs(self) -> tuple[Blob, ...]:
        """Every blob reachable from this manifest, children included."""
        return self.blobs + tuple(b for c in self.children for b in c.all_blobs)


def push_image(
    upstream: UpstreamRegistry,
    repo: str,
    tag: str = "latest",
    kind: ImageKind = "schema2",
    layers: int = 2,
    layer_size: int = 64 * 1024,
    big_layer: bool = False,
) -> PushedImage:
    """Push a fresh random image of `kind` as `repo:tag`.

    For "list"/"index" there is one child per entry of PLATFORMS, each with its own `layers`;
    `big_layer` adds one BIG_LAYER_SIZE layer (to the first child only, to keep tests fast).
    """
    with _Pusher(upstream, repo) as pusher, tempfile.TemporaryDirectory(prefix="image-") as tmp:
        if kind in ("schema2", "oci"):
            return pusher.push_single(Path(tmp), tag, kind == "oci", PLATFORMS[0], layers, layer_size, big_layer)
        oci = kind == "index"
        children = tuple(
            pusher.push_single(Path(tmp), None, oci, platform, layers, layer_size, big_layer and i == 0)
            for i, platform in enumerate(PLATFORMS)
        )
        media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
        entries = [
            {"mediaType": c.media_type, "size": len(c.manifest), "digest": c.digest, "platform": p}
            for c, p in zip(children, PLATFORMS, strict=True)
        ]
        body = _json({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
        digest = pusher.put_manifest(tag, media_type, body)
        return PushedImage(repo, tag, digest, media_type, body, (), children)


def push_schema1(upstream: UpstreamRegistry, repo: str, tag: str, layers: int = 2) -> PushedImage:
    """Push layers and a signed schema1 manifest for them (distribution checks the signature);
    the digest is the registry's, which covers the signed payload."""
    with _Pusher(upstream, repo) as pusher, tempfile.TemporaryDirectory(prefix="image-") as tmp:
        blobs = []
        for _ in range(layers):
            path = Path(tmp) / f"layer-{secrets.token_hex(4)}.tar.gz"
            digest, size, _diff_id = _write_layer(path, 4096)
            pusher.push_blob(path, digest, size)
            blobs.append(Blob(digest, size, DOCKER_LAYER))
        payload = _json(schema1.manifest_payload(repo, tag, [b.digest for b in blobs]))
        body = schema1.sign(payload)
        response = pusher.request("PUT", f"/v2/{repo}/manifests/{tag}", expect=201, body=body,
                                  headers={"Content-Type": schema1.SCHEMA1_SIGNED})
        digest = response.headers["Docker-Content-Digest"]
        if digest != schema1.payload_digest(payload):
            raise AssertionError(f"registry computed {digest}, not the payload's {schema1.payload_digest(payload)}")
        return PushedImage(repo, tag, digest, schema1.SCHEMA1_SIGNED, body, tuple(blobs))


def put_manifest(upstream: UpstreamRegistry, repo: str, reference: str, media_type: str, body: bytes) -> str:
    """PUT a manifest (e.g. an existing one under a new tag, to move a tag); return its digest."""
    with _Pusher(upstream, repo) as pusher:
        return pusher.put_manifest(reference, media_type, body)


def push_blob(upstream: UpstreamRegistry, repos: list[str], path: Path) -> Blob:
    """Push the file at `path` as a blob of each of `repos` (no manifest refers to it); its descriptor."""
    digest, size = sha256_file(path), path.stat().st_size
    for repo in repos:
        with _Pusher(upstream, repo) as pusher:
            pusher.push_blob(path, digest, size)
    return Blob(digest, size, "application/octet-stream")


def delete_manifest(upstream: UpstreamRegistry, repo: str, digest: str) -> None:
    """Delete a manifest by digest upstream (its tags go with it), to simulate upstream deletion."""
    with _Pusher(upstream, repo) as pusher:
        pusher.request("DELETE", f"/v2/{repo}/manifests/{digest}", expect=202)


class _Pusher:
    """One HTTP connection to the registry with an admin push token for one repository."""

    def __init__(self, upstream: UpstreamRegistry, repo: str) -> None:
        self.repo = repo
        self.base_url = upstream.url
        server = upstream.token_server
        token = server.issue(server.admin, [Scope("repository", repo, ("pull", "push", "delete"))])
        self.auth = f"Bearer {token}"
        self.conn = http.client.HTTPConnection(upstream.host, timeout=60)

    def __enter__(self) -> _Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def request(
        self,
        method: str,
        target: str,
        *,
        expect: int,
        body: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        self.conn.request(method, target, body=body, headers={"Authorization": self.auth, **(headers or {})})
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != expect:
            raise AssertionError(f"{method} {target}: {response.status} (expected {expect}): {payload[:500]!r}")
        return response

    def _location(self, response: http.client.HTTPResponse) -> str:
        """The next upload URL as a request target (the registry may send it absolute)."""
        url = urlsplit(urljoin(self.base_url, response.headers["Location"]))
        return f"{url.path}?{url.query}" if url.query else url.path

    def push_blob(self, path: Path, digest: str, size: int) -> None:
        """Monolithic PUT for small blobs, chunked PATCHes then PUT for big ones."""
        location = self._location(self.request("POST", f"/v2/{self.repo}/blobs/uploads/", expect=202))
        octets = {"Content-Type": "application/octet-stream"}
        with path.open("rb") as f:
            if size > UPLOAD_CHUNK:
                offset = 0
                while chunk := f.read(UPLOAD_CHUNK):
                    chunk_range = f"{offset}-{offset + len(chunk) - 1}"
                    headers = {**octets, "Content-Range": chunk_range, "Content-Length": str(len(chunk))}
                    response = self.request("PATCH", location, expect=202, body=chunk, headers=headers)
                    location = self._location(response)
                    offset += len(chunk)
                body: BinaryIO | None = None
                length = 0
            else:
                body, length = f, size
            separator = "&" if "?" in location else "?"
            target = f"{location}{separator}digest={quote(digest)}"
            self.request("PUT", target, expect=201, body=body, headers={**octets, "Content-Length": str(length)})

    def put_manifest(self, reference: str | None, media_type: str, body: bytes) -> str:
        digest = _sha256(body)
        response = self.request(
            "PUT", f"/v2/{self.repo}/manifests/{reference or digest}", expect=201, body=body,
            headers={"Content-Type": media_type},
        )
        if response.headers["Docker-Content-Digest"] != digest:
            raise AssertionError(f"registry computed {response.headers['Docker-Content-Digest']}, not {digest}")
        return digest

    def push_single(
        self,
        tmp: Path,
        tag: str | None,
        oci: bool,
        platform: dict[str, str],
        layers: int,
        layer_size: int,
        big_layer: bool,
    ) -> PushedImage:
        """Push layers, config and an image manifest (by tag, or by digest when `tag` is None)."""
        sizes = [layer_size] * layers + ([BIG_LAYER_SIZE] if big_layer else [])
        layer_blobs, diff_ids = [], []
        for size in sizes:
            path = tmp / f"layer-{secrets.token_hex(4)}.tar.gz"
            digest, compressed_size, diff_id = _write_layer(path, size)
            self.push_blob(path, digest, compressed_size)
            path.unlink()
            layer_blobs.append(Blob(digest, compressed_size, OCI_LAYER if oci else DOCKER_LAYER))
            diff_ids.append(diff_id)
        config_bytes = _json(_image_config(platform, diff_ids))
        config_path = tmp / "config.json"
        config_path.write_bytes(config_bytes)
        config = Blob(_sha256(config_bytes), len(config_bytes), OCI_CONFIG if oci else DOCKER_CONFIG)
        self.push_blob(config_path, config.digest, config.size)
        media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": _descriptor(config),
            "layers": [_descriptor(b) for b in layer_blobs],
        }
        body = _json(manifest)
        digest = self.put_manifest(tag, media_type, body)
        os_arch = "/".join(filter(None, (platform["os"], platform["architecture"], platform.get("variant"))))
        return PushedImage(self.repo, tag, digest, media_type, body, (config, *layer_blobs), platform=os_arch)


def _descriptor(blob: Blob) -> dict[str, object]:
    return {"mediaType": blob.media_type, "size": blob.size, "digest": blob.digest}


def _image_config(platform: dict[str, str], diff_ids: list[str]) -> dict[str, object]:
    created = "2024-01-01T00:00:00Z"
    return {
        **platform,
        "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": "mirror test harness"} for _ in diff_ids],
    }


def _json(value: object) -> bytes:
    return json.dumps(value, indent=3).encode()


def sha256_file(path: Path) -> str:
    """The digest of a file's content, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class _HashingWriter:
    """Write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target: BinaryIO | gzip.GzipFile) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.target.write(data)

    @property
    def digest(self) -> str:
        return f"sha256:{self.hash.hexdigest()}"


class _RandomReader:
    """`size` random bytes, read in whatever pieces tarfile asks for."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def _write_layer(path: Path, size: int) -> tuple[str, int, str]:
    """Write a gzip'd tar with one directory and one `size`-byte random file.

    Returns (blob digest, blob size, diff_id = digest of the uncompressed tar).
    """
    top = f"layer-{secrets.token_hex(4)}"
    with path.open("wb") as f:
        compressed = _HashingWriter(f)
        # mtime=0 and level 1: reproducible header, and random data does not compress anyway.
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                directory = tarfile.TarInfo(top)
                directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 1704067200
                tar.addfile(directory)
                member = tarfile.TarInfo(f"{top}/data.bin")
                member.size, member.mode, member.mtime = size, 0o644, 1704067200
                tar.addfile(member, _RandomReader(size))
    return compressed.digest, compressed.size, uncompressed.digest
