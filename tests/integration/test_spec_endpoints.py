"""Spec fidelity against the real registry (distribution, without the referrers API) and a real
mirror process: tag-list pages stay on the mirror, referrers fall back to an empty index, the
catalog lists what was pulled, and requests the HTTP parser refuses get OCI error bodies in
every worker."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Callable

import pytest

from tests.integration.images import put_manifest, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EMPTY_INDEX = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _raw(mirror: MirrorProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("route", ["default", "prefix", "ns"])
def test_kind6_tag_lists_through_every_route(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, route: str,
) -> None:
    """Any Link upstream sends stays on the mirror and on the route; Debian's distribution (2.8)
    ignores `n` on tag lists and sends none, so the whole list comes in one page here."""
    image = push_image(upstream, repo, "t0")
    for i in range(1, 5):
        put_manifest(upstream, repo, f"t{i}", image.media_type, image.manifest)
    name, ns = {"default": (repo, ""), "prefix": (f"docker.io/{repo}", ""), "ns": (repo, "&ns=docker.io")}[route]
    url, tags = f"{mirror_proc.url}/v2/{name}/tags/list?n=2{ns}", []
    for _ in range(5):
        status, headers, body = _get(url)
        assert status == 200
        tags += json.loads(body)["tags"]
        link = headers.get("Link")
        if link is None:
            break
        target = link[1:link.index(">")]
        assert target.startswith(f"/v2/{name}/tags/list?") and (ns[1:] in target), link
        url = mirror_proc.url + target
    assert sorted(tags) == ["t0", "t1", "t2", "t3", "t4"]


def test_kind12_referrers_from_a_registry_without_the_api_is_an_empty_index(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str,
) -> None:
    image = push_image(upstream, repo, "v1", kind="oci")
    status, headers, body = _get(f"{mirror_proc.url}/v2/{repo}/referrers/{image.digest}")
    assert status == 200, body
    assert headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert json.loads(body) == EMPTY_INDEX


def test_kind12_catalog_lists_what_was_pulled(upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str) -> None:
    push_image(upstream, repo, "v1")
    assert _get(f"{mirror_proc.url}/v2/{repo}/manifests/v1")[0] == 200
    status, _, body = _get(f"{mirror_proc.url}/v2/_catalog")
    assert status == 200 and repo in json.loads(body)["repositories"]


@pytest.mark.parametrize("workers", [1, 3])
def test_kind12_requests_the_parser_refuses_get_oci_errors_in_every_worker(
    mirror_factory: Callable[..., MirrorProcess], workers: int,
) -> None:
    mirror = mirror_factory(workers=workers)
    requests = [
        b"G@T /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",  # over 64 KiB
        b"GET /v2/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n",
    ]
    for request in requests * (3 * workers):  # SO_REUSEPORT spreads connections over the workers
        status, headers, body = _raw(mirror, request)
        assert status == 400, body[:200]
        assert headers["content-type"].startswith("application/json")
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNSUPPORTED" and error["message"].startswith("malformed request: ")
