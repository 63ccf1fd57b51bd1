"""Content for the seeded upstream: random files generated on disk (memory stays flat) and
pushed over the registry HTTP API (chunked PATCH uploads, 8 MiB at a time; no auth)."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

UPLOAD_CHUNK = 8 * 1024 * 1024
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What a docker/containerd client sends when it asks for a manifest.
MANIFEST_ACCEPT = ", ".join([
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])

BLOB_REPO = "library/bench"
IMAGE_REPO = "library/benchimg"
IMAGE_TAG = "latest"


@dataclass(frozen=True)
class BlobFile:
    path: Path
    digest: str
    size: int


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    digest: str
    manifest: bytes
    blobs: tuple[BlobFile, ...]  # config first, then the layers


@dataclass(frozen=True)
class Seeded:
    big: BlobFile        # the large blob (cold / warm single GETs)
    shared: BlobFile     # the blob of the 50-concurrent scenario
    image: Image         # the multi-layer image of the pull scenario


def write_random(path: Path, size: int) -> BlobFile:
    """`size` random bytes at `path`, written and hashed in 8 MiB pieces."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, UPLOAD_CHUNK))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return BlobFile(path, "sha256:" + h.hexdigest(), size)


class Pusher:
    """One HTTP connection to an auth-less registry, pushing into one repository."""

    def __init__(self, host: str, port: int, repo: str) -> None:
        self.repo = repo
        self.base = f"http://{host}:{port}"
        self.conn = http.client.HTTPConnection(host, port, timeout=300)

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def _request(self, method: str, target: str, expect: int, body=None,  # type: ignore[no-untyped-def]
                 headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        self.conn.request(method, target, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        payload = resp.read()
        if resp.status != expect:
            raise RuntimeError(f"{method} {target}: {resp.status} (expected {expect}): {payload[:300]!r}")
        return resp

    def _location(self, resp: http.client.HTTPResponse) -> str:
        url = urlsplit(urljoin(self.base, resp.headers["Location"]))
        return f"{url.path}?{url.query}" if url.query else url.path

    def push_blob(self, blob: BlobFile) -> None:
        """POST, then PATCH chunks read from the file one at a time, then PUT ?digest=."""
        location = self._location(self._request("POST", f"/v2/{self.repo}/blobs/uploads/", 202))
        octets = {"Content-Type": "application/octet-stream"}
        offset = 0
        with blob.path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                hdrs = {**octets, "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                        "Content-Length": str(len(chunk))}
                location = self._location(self._request("PATCH", location, 202, chunk, hdrs))
                offset += len(chunk)
        sep = "&" if "?" in location else "?"
        self._request("PUT", f"{location}{sep}digest={quote(blob.digest)}", 201, b"",
                      {**octets, "Content-Length": "0"})

    def put_manifest(self, reference: str, media_type: str, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        resp = self._request("PUT", f"/v2/{self.repo}/manifests/{reference}", 201, body,
                             {"Content-Type": media_type, "Content-Length": str(len(body))})
        if resp.headers.get("Docker-Content-Digest") != digest:
            raise RuntimeError(f"registry computed {resp.headers.get('Docker-Content-Digest')}, not {digest}")
        return digest


def seed(host: str, port: int, files: Path, big_bytes: int, shared_bytes: int, layers: int,
         layer_bytes: int) -> Seeded:
    files.mkdir(parents=True, exist_ok=True)
    big = write_random(files / "big.bin", big_bytes)
    shared = write_random(files / "shared.bin", shared_bytes)
    with Pusher(host, port, BLOB_REPO) as p:
        p.push_blob(big)
        p.push_blob(shared)
    layer_files = [write_random(files / f"layer{i:02d}.bin", layer_bytes) for i in range(layers)]
    config = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layer_files]},
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_path = files / "config.json"
    config_path.write_bytes(config_bytes)
    config_blob = BlobFile(config_path, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes))
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config_blob.size, "digest": config_blob.digest},
        "layers": [{"mediaType": DOCKER_LAYER, "size": b.size, "digest": b.digest} for b in layer_files],
    }, indent=3).encode()
    with Pusher(host, port, IMAGE_REPO) as p:
        for b in (config_blob, *layer_files):
            p.push_blob(b)
        digest = p.put_manifest(IMAGE_TAG, DOCKER_MANIFEST, manifest)
    (files / "manifest.json").write_bytes(manifest)
    image = Image(IMAGE_REPO, IMAGE_TAG, digest, manifest, (config_blob, *layer_files))
    return Seeded(big, shared, image)
