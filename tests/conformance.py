"""The pull workflow of the OCI distribution-spec conformance suite (v1.1.1), ported from Go.

`conformance/01_pull_test.go` and `setup.go` of github.com/opencontainers/distribution-spec at
v1.1.1, as the suite runs against a registry that cannot be pushed to: `OCI_TAG_NAME`,
`OCI_MANIFEST_DIGEST` and `OCI_BLOB_DIGEST` are set, so the setup and teardown specs do not
run (`runPullSetup` is false) and every manifest / config digest the specs use is the one from
the environment. That leaves the 14 specs below, in the suite's order. The test content is
built as setup.go builds it, so a test can put it upstream in place of the suite's push.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TEST_TAG = "tagtest0"
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
INVALID_MANIFEST_CONTENT = b"blablabla"
DUMMY_DIGEST = "sha256:" + hashlib.sha256(b"hello world").hexdigest()
LAYER = base64.b64decode(
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA"
)
ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "MANIFEST_UNVERIFIED", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID",
    "TAG_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
}
_LETTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _go_json(value: object) -> bytes:
    """json.MarshalIndent(value, "", "\\t") for the shapes used here."""
    return json.dumps(value, indent="\t", separators=(",", ": ")).encode()


@dataclass(frozen=True)
class Blob:
    content: bytes
    digest: str


@dataclass(frozen=True)
class PullContent:
    """What setup.go builds for the pull workflow: two configs, one layer, two manifests."""

    configs: tuple[Blob, Blob]
    layer: Blob
    manifests: tuple[Blob, Blob]


def build_content() -> PullContent:
    configs = []
    for _ in range(2):  # a random author gives each config (and so each manifest) its own digest
        author = "".join(secrets.choice(_LETTERS) for _ in range(16))
        config = _go_json({"author": author, "architecture": "amd64", "os": "linux",
                           "rootfs": {"type": "layers", "diff_ids": []}})
        configs.append(Blob(config, _digest(config)))
    layer = Blob(LAYER, _digest(LAYER))
    manifests = []
    for config in configs:
        manifest = _go_json({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest,
                "size": len(config.content),
                "data": base64.b64encode(config.content).decode(),
                "newUnspecifiedField": base64.b64encode(b"hello world").decode(),
            },
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.digest,
                        "size": len(layer.content), "newUnspecifiedField": None}],
        })
        manifests.append(Blob(manifest, _digest(manifest)))
    return PullContent((configs[0], configs[1]), layer, (manifests[0], manifests[1]))


@dataclass(frozen=True)
class Environment:
    """OCI_ROOT_URL, OCI_NAMESPACE, OCI_TAG_NAME, OCI_MANIFEST_DIGEST, OCI_BLOB_DIGEST."""

    root_url: str
    namespace: str
    tag_name: str
    manifest_digest: str
    blob_digest: str


Spec = tuple[str, Callable[[aiohttp.ClientSession, Environment], Awaitable[None]]]


async def _request(session: aiohttp.ClientSession, env: Environment, method: str, path: str,
                   headers: dict[str, str] | None = None, body: bytes | None = None) -> aiohttp.ClientResponse:
    url = env.root_url.rstrip("/") + path.replace("<name>", env.namespace)
    headers = {"User-Agent": "distribution-spec-conformance-tests", **(headers or {})}
    async with session.request(method, url, headers=headers, data=body, allow_redirects=True) as resp:
        await resp.read()
        return resp


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def _digest_header(resp: aiohttp.ClientResponse, want: str) -> None:
    if h := resp.headers.get("Docker-Content-Digest"):
        _expect(h == want, f"Docker-Content-Digest {h}, expected {want}")


async def _tag_from_env(session: aiohttp.ClientSession, env: Environment) -> None:
    _expect(bool(env.tag_name), "OCI_TAG_NAME is empty")


async def _head_nonexistent_blob(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "HEAD", f"/v2/<name>/blobs/{DUMMY_DIGEST}")
    _expect(resp.status == 404, f"status {resp.status}, expected 404")


async def _head_blob(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "HEAD", f"/v2/<name>/blobs/{env.blob_digest}")
    _expect(resp.status == 200, f"status {resp.status}, expected 200")
    _digest_header(resp, env.blob_digest)


async def _get_nonexistent_blob(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "GET", f"/v2/<name>/blobs/{DUMMY_DIGEST}")
    _expect(resp.status == 404, f"status {resp.status}, expected 404")


async def _get_blob(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "GET", f"/v2/<name>/blobs/{env.blob_digest}")
    _expect(resp.status == 200, f"status {resp.status}, expected 200")


async def _head_nonexistent_manifest(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "HEAD", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    _expect(resp.status == 404, f"status {resp.status}, expected 404")


async def _head_manifest_by_digest(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "HEAD", f"/v2/<name>/manifests/{env.manifest_digest}", {"Accept": OCI_MANIFEST})
    _expect(resp.status == 200, f"status {resp.status}, expected 200")
    _digest_header(resp, env.manifest_digest)


async def _head_manifest_by_tag(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "HEAD", f"/v2/<name>/manifests/{env.tag_name}", {"Accept": OCI_MANIFEST})
    _expect(resp.status == 200, f"status {resp.status}, expected 200")
    _digest_header(resp, env.manifest_digest)


async def _get_nonexistent_manifest(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "GET", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    _expect(resp.status == 404, f"status {resp.status}, expected 404")


async def _get_manifest_by_digest(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "GET", f"/v2/<name>/manifests/{env.manifest_digest}", {"Accept": OCI_MANIFEST})
    _expect(resp.status == 200, f"status {resp.status}, expected 200")


async def _get_manifest_by_tag(session: aiohttp.ClientSession, env: Environment) -> None:
    resp = await _request(session, env, "GET", f"/v2/<name>/manifests/{env.tag_name}", {"Accept": OCI_MANIFEST})
    _expect(resp.status == 200, f"status {resp.status}, expected 200")


async def _error_body(session: aiohttp.ClientSession, env: Environment) -> None:
    url = env.root_url.rstrip("/") + f"/v2/{env.namespace}/manifests/sha256:totallywrong"
    async with session.get(url, headers={"Content-Type": OCI_MANIFEST}, data=INVALID_MANIFEST_CONTENT) as resp:
        body = await resp.read()
    _expect(resp.status in (400, 404), f"status {resp.status}, expected 400 or 404")
    if resp.status == 400:
        errors = json.loads(body).get("errors")
        _expect(bool(errors), "no errors in the 400 body")
        _expect(errors[0].get("code") in ERROR_CODES, f"code {errors[0].get('code')!r} is not an OCI error code")


# In 01_pull_test.go's order; the two "manifest[0]/[1] (digest)" specs use the same digest from the environment.
PULL_SPECS: list[Spec] = [
    ("Setup: Get tag name from environment", _tag_from_env),
    ("Pull blobs: HEAD request to nonexistent blob should result in 404 response", _head_nonexistent_blob),
    ("Pull blobs: HEAD request to existing blob should yield 200", _head_blob),
    ("Pull blobs: GET nonexistent blob should result in 404 response", _get_nonexistent_blob),
    ("Pull blobs: GET request to existing blob URL should yield 200", _get_blob),
    ("Pull manifests: HEAD request to nonexistent manifest should return 404", _head_nonexistent_manifest),
    ("Pull manifests: HEAD request to manifest[0] path (digest) should yield 200 response", _head_manifest_by_digest),
    ("Pull manifests: HEAD request to manifest[1] path (digest) should yield 200 response", _head_manifest_by_digest),
    ("Pull manifests: HEAD request to manifest path (tag) should yield 200 response", _head_manifest_by_tag),
    ("Pull manifests: GET nonexistent manifest should return 404", _get_nonexistent_manifest),
    ("Pull manifests: GET request to manifest[0] path (digest) should yield 200 response", _get_manifest_by_digest),
    ("Pull manifests: GET request to manifest[1] path (digest) should yield 200 response", _get_manifest_by_digest),
    ("Pull manifests: GET request to manifest path (tag) should yield 200 response", _get_manifest_by_tag),
    ("Error codes: 400 response body should contain OCI-conforming JSON message", _error_body),
]


async def run_pull(env: Environment) -> list[tuple[str, str | None]]:
    """Run the 14 pull specs in order: (spec, None when it passed, else why it failed)."""
    results: list[tuple[str, str | None]] = []
    async with aiohttp.ClientSession() as session:
        for title, spec in PULL_SPECS:
            try:
                await spec(session, env)
            except (AssertionError, aiohttp.ClientError, ValueError) as exc:
                results.append((title, str(exc) or type(exc).__name__))
            else:
                results.append((title, None))
    return results
