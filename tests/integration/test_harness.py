"""The integration harness itself works: images pushed by `images.py` are pulled intact by a
real client (skopeo), the token server's policy is enforced by the real registry, and the
access-log counters and outage switch do what they say."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.images import (
    BIG_LAYER_SIZE,
    DOCKER_MANIFEST,
    ImageKind,
    delete_manifest,
    push_image,
    put_manifest,
    sha256_file,
)
from tests.integration.registry import UpstreamRegistry, require_binary

pytestmark = pytest.mark.integration


def skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run skopeo; `--insecure-policy` so no /etc/containers/policy.json is needed."""
    cmd = [require_binary("skopeo"), "--insecure-policy", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=False)


def creds(upstream: UpstreamRegistry) -> str:
    return ":".join(upstream.admin_credentials)


def inspect_raw(upstream: UpstreamRegistry, ref: str, *auth: str) -> subprocess.CompletedProcess[bytes]:
    """`skopeo inspect --raw` of `repo:tag` or `repo@digest`; admin credentials unless `auth` given."""
    auth = auth or ("--creds", creds(upstream))
    return skopeo("inspect", "--raw", "--tls-verify=false", *auth, f"docker://{upstream.host}/{ref}")


@pytest.mark.parametrize("kind", ["schema2", "oci", "list", "index"])
def test_pushed_image_is_pulled_intact(
    upstream: UpstreamRegistry, repo: str, kind: ImageKind, tmp_path: Path
) -> None:
    image = push_image(upstream, repo, "v1", kind=kind)
    raw = inspect_raw(upstream, image.reference)
    assert raw.returncode == 0, raw.stderr.decode()
    assert raw.stdout == image.manifest
    assert json.loads(raw.stdout)["mediaType"] == image.media_type

    # dir: keeps manifests byte for byte (oci: would convert Docker ones) and names blobs by digest.
    out = tmp_path / "out"
    source = f"docker://{upstream.host}/{image.reference}"
    copied = skopeo("copy", "--all", "--src-tls-verify=false", "--src-creds", creds(upstream), source, f"dir:{out}")
    assert copied.returncode == 0, copied.stderr.decode()
    assert (out / "manifest.json").read_bytes() == image.manifest
    for child in image.children:
        child_file = out / f"{child.digest.removeprefix('sha256:')}.manifest.json"
        assert child_file.read_bytes() == child.manifest
    blobs = {f"sha256:{p.name}": p for p in out.iterdir() if len(p.name) == 64}
    assert set(blobs) == {b.digest for b in image.all_blobs}
    for blob in image.all_blobs:
        assert sha256_file(blobs[blob.digest]) == blob.digest
        assert blobs[blob.digest].stat().st_size == blob.size
    assert upstream.count("GET", f"/v2/{repo}/blobs/{image.all_blobs[-1].digest}", status=200) == 1


def test_big_layer_is_uploaded_in_chunks(upstream: UpstreamRegistry, repo: str, tmp_path: Path) -> None:
    image = push_image(upstream, repo, "big", layers=1, big_layer=True)
    big = image.blobs[-1]
    assert big.size > BIG_LAYER_SIZE  # random data does not compress; tar and gzip add headers
    assert upstream.count("PATCH", f"/v2/{repo}/blobs/uploads/", status=202) >= 8

    copied = skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", creds(upstream),
        f"docker://{upstream.host}/{image.reference}", f"oci:{tmp_path / 'oci'}:big",
    )
    assert copied.returncode == 0, copied.stderr.decode()
    assert sha256_file(tmp_path / "oci" / "blobs" / "sha256" / big.digest.removeprefix("sha256:")) == big.digest


def test_anonymous_may_pull_public_but_not_private(upstream: UpstreamRegistry, repo: str) -> None:
    public = push_image(upstream, repo, "v1", layers=1)
    private = push_image(upstream, f"{repo}-private", "v1", layers=1)
    upstream.token_server.users["bob"] = "bob-password"
    upstream.token_server.private[private.repo] = {"bob"}

    assert inspect_raw(upstream, public.reference, "--no-creds").stdout == public.manifest
    refused = inspect_raw(upstream, private.reference, "--no-creds")
    assert refused.returncode != 0
    assert b"unauthorized" in refused.stderr.lower() or b"denied" in refused.stderr.lower()
    assert inspect_raw(upstream, private.reference, "--creds", "bob:bob-password").stdout == private.manifest
    assert inspect_raw(upstream, private.reference, "--creds", "bob:wrong").returncode != 0
    assert ("anonymous", f"repository:{private.repo}:pull") in upstream.token_server.requests
    assert ("bob", f"repository:{private.repo}:pull") in upstream.token_server.requests


def test_token_endpoint_speaks_get_and_oauth_post(upstream: UpstreamRegistry, repo: str) -> None:
    server = upstream.token_server
    scope = f"repository:{repo}:pull,push"
    query = urllib.parse.urlencode({"service": server.service, "scope": scope})
    basic = base64.b64encode(b"admin:nope").decode()
    wrong = urllib.request.Request(f"{server.realm}?{query}", headers={"Authorization": f"Basic {basic}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong)
    assert refused.value.code == 401
    assert "details" in json.load(refused.value)

    def post(**form: str) -> dict[str, object]:
        body = urllib.parse.urlencode({"service": server.service, "client_id": "test", **form}).encode()
        with urllib.request.urlopen(server.realm, data=body) as response:
            return dict(json.load(response))

    user, password = upstream.admin_credentials
    first = post(grant_type="password", username=user, password=password, scope=scope, access_type="offline")
    assert {"token", "access_token", "expires_in", "issued_at", "refresh_token"} <= set(first)
    again = post(grant_type="refresh_token", refresh_token=str(first["refresh_token"]), scope=scope)
    claims = json.loads(base64.urlsafe_b64decode(str(again["token"]).split(".")[1] + "=="))
    assert claims["sub"] == user
    assert claims["access"] == [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
    assert server.requests == [(user, scope), (user, scope)]


def test_tags_can_move_and_vanish_upstream(upstream: UpstreamRegistry, repo: str) -> None:
    old = push_image(upstream, repo, "v1", layers=1)
    new = push_image(upstream, repo, "v2", layers=1)
    assert put_manifest(upstream, repo, "v1", DOCKER_MANIFEST, new.manifest) == new.digest
    assert inspect_raw(upstream, f"{repo}:v1").stdout == new.manifest
    assert inspect_raw(upstream, f"{repo}@{old.digest}").stdout == old.manifest
    delete_manifest(upstream, repo, new.digest)
    assert inspect_raw(upstream, f"{repo}:v1").returncode != 0
    assert inspect_raw(upstream, f"{repo}:v2").returncode != 0


def test_outage_keeps_port_and_content(upstream: UpstreamRegistry, repo: str) -> None:
    image = push_image(upstream, repo, "v1", layers=1)
    upstream.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{upstream.url}/v2/", timeout=2)
    assert upstream.requests()  # the log stays readable while the registry is down
    upstream.start()
    assert inspect_raw(upstream, image.reference).stdout == image.manifest
    assert upstream.count("GET", f"/v2/{repo}/manifests/v1", status=200) == 1
