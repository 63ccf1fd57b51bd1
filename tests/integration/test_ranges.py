"""Several ranges in one request, shaped as podman 5 reads a zstd:chunked layer's table of contents
(`Range: bytes=A-B,C-D`), through a mirror process with two workers against the real registry:
on a miss (the layer still arriving) and on a hit, each answer a 206 multipart/byteranges whose
parts are checked byte for byte."""
from __future__ import annotations

import hashlib
from typing import Callable

import pytest

from tests.byteranges import parse_byteranges
from tests.integration.images import push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry
from tests.integration.test_workers import get, many, wait_served_by_both, wait_for_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _check(answers: list[tuple[int, dict[str, str], bytes]], layer: bytes, want: list[tuple[int, int]]) -> None:
    for status, headers, body in answers:
        assert status == 206, (status, body[:200])
        assert int(headers["Content-Length"]) == len(body)
        parts = parse_byteranges(headers["Content-Type"], body)
        assert parts == [("application/octet-stream", f"bytes {a}-{b - 1}/{len(layer)}", layer[a:b]) for a, b in want]


def test_podman_table_of_contents_ranges_on_a_miss_and_on_a_hit(
    mirror_factory: Callable[..., MirrorProcess], upstream: UpstreamRegistry, repo: str
) -> None:
    mirror = mirror_factory(workers=2)
    wait_for_workers(mirror, 2)
    image = push_image(upstream, repo, "v1", layers=1, big_layer=True)
    big = max(image.blobs, key=lambda b: b.size)
    url = f"{mirror.url}/v2/{repo}/blobs/{big.digest}"
    size = big.size
    # two stretches near the end with a small gap between them, as podman 5 asks for the TOC and its footer
    a, b, c, d = size - 420_000, size - 200_001, size - 199_993, size - 1
    ranges = {"Range": f"bytes={a}-{b},{c}-{d}"}
    cold = many(6, lambda _: get(url, ranges))  # the layer is being fetched while they ask
    status, headers, layer = get(url)
    assert status == 200 and f"sha256:{hashlib.sha256(layer).hexdigest()}" == big.digest
    want = [(a, b + 1), (c, d + 1)]
    _check(cold, layer, want)
    assert upstream.count("GET", f"/blobs/{big.digest}", status=200) == 1
    mirror.wait_idle()
    warm = many(12, lambda _: get(url, ranges))
    _check(warm, layer, want)
    assert {h["X-Mirror-Cache"] for _, h, _ in warm} == {"hit"}
    assert {next(v for k, v in h.items() if k.lower() == "etag") for _, h, _ in cold + warm} == {f'"{big.digest}"'}
    wait_served_by_both(mirror, big.digest)
    assert upstream.count("GET", f"/blobs/{big.digest}", status=200) == 1
