"""Token passthrough, the no-leak policy, rate limits and routing, against the real registry.

The upstream is distribution with token auth; its token server has a private
repository only `alice` may read. Clients log in to the mirror exactly as users
do; the token server's log shows whose identity reached the upstream.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Callable

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.integration.clients import Client, ClientError
from tests.integration.images import PushedImage, push_image
from tests.integration.mirror_process import MirrorProcess
from tests.integration.registry import UpstreamRegistry, random_repo

pytestmark = pytest.mark.integration

ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")


@pytest.fixture
def private(upstream: UpstreamRegistry, repo: str) -> PushedImage:
    server = upstream.token_server
    server.users.update(dict([ALICE, BOB]))
    server.private[repo] = {ALICE[0]}
    return push_image(upstream, repo, "v1")


def _request(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _basic(creds: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}


def _token(mirror: MirrorProcess, repo: str, creds: tuple[str, str] | None) -> tuple[int, dict[str, str]]:
    status, _, body = _request(f"{mirror.url}/token?service=mirror&scope=repository:{repo}:pull",
                               _basic(creds) if creds else {})
    return status, ({"Authorization": f"Bearer {json.loads(body)['token']}"} if status == 200 else {})


def test_private_image_pulls_as_the_client_itself(
    pull_client: Client, upstream: UpstreamRegistry, mirror_proc: MirrorProcess, repo: str, private: PushedImage
) -> None:
    assert pull_client.pull(mirror_proc.host, repo, "v1", creds=ALICE) == private.digest
    seen = {r.principal for r in upstream.token_server.requests if repo in r.scope}
    # containerd first tries without credentials (and is refused): then as alice, never as anyone else
    assert "alice" in seen and seen <= {"alice", "anonymous"}, f"upstream saw {seen}"


def test_anonymous_and_wrong_credentials_cannot_pull_it(
    pull_client: Client, mirror_proc: MirrorProcess, repo: str, private: PushedImage
) -> None:
    assert pull_client.pull(mirror_proc.host, repo, "v1", creds=ALICE) == private.digest
    pull_client.remove_all()
    for creds in (None, (ALICE[0], "wrong"), BOB):
        with pytest.raises(ClientError):
            pull_client.pull(mirror_proc.host, repo, "v1", creds=creds)


def test_cached_private_content_is_refused_by_tag_digest_and_blob(
    upstream: UpstreamRegistry, mirror_proc: MirrorProcess, skopeo_client: Client, repo: str, private: PushedImage
) -> None:
    other = random_repo()
    push_image(upstream, other, "v1")
    assert skopeo_client.pull(mirror_proc.host, repo, "v1", creds=ALICE) == private.digest
    assert _token(mirror_proc, repo, (ALICE[0], "wrong"))[0] == 401
    anonymous = _token(mirror_proc, repo, None)[1]
    bob = _token(mirror_proc, repo, BOB)[1]
    # anonymous clients are challenged (401), refused credentials denied (403), and the private
    # content asked for through the public repository is not there (404) for whoever may read that
    for who, headers, in_private, in_public in (("anonymous", anonymous, 401, 404), ("bob", bob, 403, 404),
                                                ("wrong-basic", _basic((ALICE[0], "wrong")), 403, 403)):
        for name, expected in ((repo, in_private), (other, in_public)):
            paths = [f"/v2/{name}/manifests/{private.digest}", *(f"/v2/{name}/blobs/{b.digest}" for b in private.all_blobs)]
            if name == repo:
                paths.append(f"/v2/{name}/manifests/v1")
            for path in paths:
                status, _, body = _request(mirror_proc.url + path, headers)
                assert status == expected, (who, path, status)
                unknown = "MANIFEST_UNKNOWN" if "/manifests/" in path else "BLOB_UNKNOWN"
                code = {401: "UNAUTHORIZED", 403: "DENIED"}.get(status, unknown)
                assert json.loads(body)["errors"][0]["code"] == code, (who, path)


def test_rate_limited_upstream(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorProcess],
    skopeo_client: Client,
) -> None:
    mirror = mirror_factory(tag_ttl="0s")
    cached, fresh = random_repo(), random_repo()
    pushed = push_image(upstream, cached, "v1")
    push_image(upstream, fresh, "v1")
    fault_proxy.ratelimit_remaining = 3
    assert skopeo_client.pull(mirror.host, cached, "v1") == pushed.digest
    assert mirror.metric("mirror_upstream_ratelimit_remaining", upstream="docker.io", source="192.0.2.7") == 3
    fault_proxy.retry_after, fault_proxy.ratelimit_remaining = 3600, 0
    skopeo_client.remove_all()
    assert skopeo_client.pull(mirror.host, cached, "v1") == pushed.digest  # cached images still pull
    auth = _token(mirror, fresh, None)[1]
    status, headers, body = _request(f"{mirror.url}/v2/{fresh}/manifests/v1", auth)
    assert status == 429 and json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 0 < int(headers["Retry-After"]) <= 3600
    gets = [r for r in fault_proxy.requests if r[0] == "GET" and fresh in r[1]]
    for _ in range(3):
        assert _request(f"{mirror.url}/v2/{fresh}/manifests/v1", auth)[0] == 429
    assert [r for r in fault_proxy.requests if r[0] == "GET" and fresh in r[1]] == gets, "a GET went upstream"
    assert mirror.metric("mirror_upstream_ratelimit_remaining", upstream="docker.io", source="192.0.2.7") == 0


def test_routing_by_ns_and_path_prefix(
    upstream: UpstreamRegistry, fault_proxy: FaultProxy, mirror_factory: Callable[..., MirrorProcess], repo: str,
) -> None:
    mirror = mirror_factory(extra=f'[upstreams."registry.test.io"]\nurl = "{upstream.url}"\n')
    image = push_image(upstream, repo, "v1")
    auth = _token(mirror, repo, None)[1]
    for path in (f"/v2/registry.test.io/{repo}/manifests/v1", f"/v2/{repo}/manifests/v1?ns=registry.test.io"):
        status, headers, _ = _request(mirror.url + path, auth)
        assert status == 200 and headers["Docker-Content-Digest"] == image.digest, path
    assert not [r for r in fault_proxy.requests if repo in r[1]], "registry.test.io pulls went to docker.io"
    status, _, _ = _request(f"{mirror.url}/v2/{repo}/manifests/v1", auth)
    assert status == 200 and [r for r in fault_proxy.requests if repo in r[1]]
    for path, want in ((f"/v2/evil.example/{repo}/manifests/v1", ("NAME_UNKNOWN", 404)),
                       (f"/v2/{repo}/manifests/v1?ns=evil.example", ("NAME_UNKNOWN", 404)),
                       (f"/v2/{repo}/manifests/v1?ns=evil.example:443", ("NAME_UNKNOWN", 404)),
                       (f"/v2/{repo}/manifests/v1?ns=http://evil.example/x", ("NAME_INVALID", 400))):
        status, _, body = _request(mirror.url + path, auth)
        assert (json.loads(body)["errors"][0]["code"], status) == want, path
