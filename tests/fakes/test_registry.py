"""The fake registry behaves like the real registries the mirror has to cope with."""

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from tests.fakes.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    FakeRegistry,
    digest_of,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def fake(fake_registry: FakeRegistry) -> FakeRegistry:
    return fake_registry


async def test_base_answers_with_api_version(fake: FakeRegistry,
                                             session: aiohttp.ClientSession) -> None:
    async with session.get(f"{fake.url}/v2/") as r:
        assert r.status == 200
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert fake.count(kind="base") == 1


async def test_image_is_pullable_by_tag_and_digest(fake: FakeRegistry,
                                                   session: aiohttp.ClientSession) -> None:
    image = fake.add_image("library/alpine", "3.20", 2)
    for ref in ("3.20", image.digest):
        async with session.get(f"{fake.url}/v2/library/alpine/manifests/{ref}") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == DOCKER_MANIFEST
            assert r.headers["Docker-Content-Digest"] == image.digest
            assert await r.read() == image.body
    manifest = json.loads(image.body)
    assert manifest["config"]["digest"] == image.config_digest
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests
    for digest in [image.config_digest, *image.layer_digests]:
        async with session.get(f"{fake.url}/v2/library/alpine/blobs/{digest}") as r:
            assert r.status == 200
            assert digest_of(await r.read()) == digest


async def test_head_has_length_and_no_body(fake: FakeRegistry,
                                           session: aiohttp.ClientSession) -> None:
    image = fake.add_image("library/alpine", "latest", 1, kind="oci")
    async with session.head(f"{fake.url}/v2/library/alpine/manifests/latest") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert int(r.headers["Content-Length"]) == len(image.body)
        assert await r.read() == b""
    async with session.head(f"{fake.url}/v2/library/alpine/blobs/{image.layer_digests[0]}") as r:
        assert int(r.headers["Content-Length"]) == len(image.layers[0])
    assert fake.count("HEAD") == 2 and fake.count("GET") == 0


async def test_unknown_things_get_oci_errors(fake: FakeRegistry,
                                             session: aiohttp.ClientSession) -> None:
    fake.add_image("a/b/c", "x", 1)
    missing = digest_of(b"nothing")
    for path, code in [("nope/manifests/x", "NAME_UNKNOWN"), ("nope/tags/list", "NAME_UNKNOWN"),
                       ("a/b/c/manifests/y", "MANIFEST_UNKNOWN"),
                       (f"a/b/c/blobs/{missing}", "BLOB_UNKNOWN")]:
        async with session.get(f"{fake.url}/v2/{path}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == code
    assert fake.count(repo="a/b/c") == 2


async def test_accept_excluding_the_stored_type_is_404(fake: FakeRegistry,
                                                       session: aiohttp.ClientSession) -> None:
    fake.add_image("library/alpine", "latest", 1)
    url = f"{fake.url}/v2/library/alpine/manifests/latest"
    for accept, status in [(OCI_MANIFEST, 404), (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", 200),
                           ("*/*", 200)]:
        async with session.get(url, headers={"Accept": accept}) as r:
            assert r.status == status
    assert fake.requests[0].headers["Accept"] == OCI_MANIFEST


async def test_index_tags_and_removal(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    amd = fake.add_image("library/alpine", None, 1)
    arm = fake.add_image("library/alpine", None, 1, platform="linux/arm64/v8")
    index = fake.add_index("library/alpine", "latest", [amd, arm])
    assert index.media_type == DOCKER_LIST
    entries = json.loads(index.body)["manifests"]
    assert entries[1]["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    fake.set_tag("library/alpine", "stable", amd.digest)
    async with session.get(f"{fake.url}/v2/library/alpine/tags/list") as r:
        assert await r.json() == {"name": "library/alpine", "tags": ["latest", "stable"]}
    fake.remove("library/alpine", amd.digest)
    assert fake.repos["library/alpine"].tags == {"latest": index.digest}
    fake.remove("library/alpine")
    assert fake.repos == {}


async def test_range(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    data = bytes(range(100))
    digest = fake.add_blob("r", data)
    url = f"{fake.url}/v2/r/blobs/{digest}"
    for header, expected, content_range in [("bytes=10-19", data[10:20], "bytes 10-19/100"),
                                            ("bytes=90-", data[90:], "bytes 90-99/100"),
                                            ("bytes=-5", data[95:], "bytes 95-99/100")]:
        async with session.get(url, headers={"Range": header}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == content_range
            assert await r.read() == expected
    async with session.get(url, headers={"Range": "bytes=100-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == "bytes */100"


async def test_corrupt_blobs_keep_their_length(fake: FakeRegistry,
                                               session: aiohttp.ClientSession) -> None:
    data = b"layer" * 1000
    digest = fake.add_blob("r", data)
    fake.corrupt_blobs = True
    async with session.get(f"{fake.url}/v2/r/blobs/{digest}") as r:
        body = await r.read()
    assert len(body) == len(data) and digest_of(body) != digest
    assert sum(a != b for a, b in zip(body, data)) == 1


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def _pull_manifest_with_token(session: aiohttp.ClientSession, url: str,
                                    auth: dict[str, str] | None = None) -> int:
    """What a client does: follow the challenge to the realm, retry with the token."""
    async with session.get(url) as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
    params = dict(part.split("=", 1) for part in challenge.removeprefix("Bearer ").split(","))
    params = {k: v.strip('"') for k, v in params.items()}
    query = {"service": params["service"], "scope": params["scope"]}
    async with session.get(params["realm"], params=query, headers=auth) as r:
        token = (await r.json())["token"]
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_bearer_auth_dance(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.require_auth = True
    fake.add_image("library/alpine", "latest", 1)
    url = f"{fake.url}/v2/library/alpine/manifests/latest"
    async with session.get(url) as r:
        assert r.headers["WWW-Authenticate"] == (
            f'Bearer realm="{fake.url}/token",service="fake",'
            'scope="repository:library/alpine:pull"')
    assert await _pull_manifest_with_token(session, url) == 200
    (token,) = fake.tokens.values()
    assert token.user is None and token.service == "fake"
    assert token.requested == ("repository:library/alpine:pull",)
    assert fake.count(kind="token") == 1
    fake.clock = lambda: token.expires_at  # expired now
    async with session.get(url, headers={"Authorization": f"Bearer {token.value}"}) as r:
        assert r.status == 401
        assert "insufficient_scope" not in r.headers["WWW-Authenticate"]


async def test_private_repo_needs_an_allowed_user(fake: FakeRegistry,
                                                  session: aiohttp.ClientSession) -> None:
    fake.users = {"alice": "pw", "bob": "pw"}
    fake.private = {"alice/secret": {"alice"}}
    fake.add_image("alice/secret", "latest", 1)
    fake.add_image("library/alpine", "latest", 1)
    url = f"{fake.url}/v2/alice/secret/manifests/latest"
    async with session.get(f"{fake.url}/v2/library/alpine/manifests/latest") as r:
        assert r.status == 200  # public repos stay open without require_auth
    assert await _pull_manifest_with_token(session, url) == 401  # anonymous
    async with session.get(url, headers={"Authorization": "Bearer x"}) as r:
        assert "insufficient_scope" not in r.headers["WWW-Authenticate"]
    token = list(fake.tokens.values())[-1]
    async with session.get(url, headers={"Authorization": f"Bearer {token.value}"}) as r:
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert await _pull_manifest_with_token(session, url, basic("bob", "pw")) == 401
    assert await _pull_manifest_with_token(session, url, basic("alice", "pw")) == 200
    assert [t.granted for t in fake.tokens.values()] == [
        frozenset(), frozenset(), frozenset({"alice/secret"})]
    async with session.get(f"{fake.url}/token", headers=basic("alice", "bad")) as r:
        assert r.status == 401


async def test_basic_auth_scheme(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.require_auth, fake.auth_scheme, fake.users = True, "basic", {"alice": "pw"}
    url = f"{fake.url}/v2/"
    async with session.get(url) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="fake"'
    async with session.get(url, headers=basic("alice", "pw")) as r:
        assert r.status == 200


async def test_blob_redirect_drops_authorization(fake: FakeRegistry,
                                                 session: aiohttp.ClientSession) -> None:
    fake.require_auth = True
    fake.redirect_blobs = True
    digest = fake.add_blob("r", b"payload")
    url = f"{fake.url}/v2/r/blobs/{digest}"
    async with session.get(f"{fake.url}/token", params={"scope": "repository:r:pull"}) as r:
        auth = {"Authorization": f"Bearer {(await r.json())['token']}"}
    async with session.get(url, headers=auth, allow_redirects=False) as r:
        assert r.status == 307
        location = URL(r.headers["Location"])
    assert location.host == "localhost" and location.path == f"/cdn/{digest}"
    async with session.get(url, headers=auth) as r:
        assert r.status == 200 and await r.read() == b"payload"
    assert fake.cdn_auth_headers == [None]
    async with session.get(location.with_query(sig="forged")) as r:
        assert r.status == 403


async def test_rate_limit(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    image = fake.add_image("library/alpine", "latest", 1)
    fake.ratelimit_headers = (100, 42)
    url = f"{fake.url}/v2/library/alpine/manifests/latest"
    async with session.get(url) as r:
        assert r.headers["ratelimit-remaining"] == "42;w=21600"
    fake.rate_limited, fake.retry_after = True, 7
    for path in (url, f"{fake.url}/v2/library/alpine/blobs/{image.config_digest}"):
        async with session.get(path) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "7"
            assert r.headers["ratelimit-limit"] == "100;w=21600"
            assert r.headers["ratelimit-remaining"] == "0;w=21600"
            assert r.headers["docker-ratelimit-source"] == "127.0.0.1"
            assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    async with session.head(url) as r:
        assert r.status == 200
    assert fake.count("GET", "manifest") == 2 and fake.count("HEAD", "manifest") == 1
    fake.reset_counts()
    assert fake.count() == 0


async def test_fail_status_and_missing_headers(fake: FakeRegistry,
                                               session: aiohttp.ClientSession) -> None:
    digest = fake.add_blob("r", b"x" * 1000)
    fake.add_image("r", "latest", 1)
    fake.fail_status = 503
    async with session.get(f"{fake.url}/v2/") as r:
        assert r.status == 503
    fake.fail_status = None
    fake.omit_digest_header = fake.omit_content_length = True
    async with session.get(f"{fake.url}/v2/r/manifests/latest") as r:
        assert "Docker-Content-Digest" not in r.headers
    async with session.get(f"{fake.url}/v2/r/blobs/{digest}") as r:
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert await r.read() == b"x" * 1000


async def test_stall_after_first_chunk(fake: FakeRegistry,
                                       session: aiohttp.ClientSession) -> None:
    data = bytes(range(256)) * 40
    digest = fake.add_blob("r", data)
    fake.chunk_size, fake.stall = 1024, asyncio.Event()
    async with session.get(f"{fake.url}/v2/r/blobs/{digest}") as r:
        assert await r.content.readexactly(1024) == data[:1024]
        rest = asyncio.ensure_future(r.content.read())
        await asyncio.sleep(0.05)  # the fake must not send anything while stalled
        assert not rest.done()
        fake.stall.set()
        assert await rest == data[1024:]


async def test_hold_stops_every_get_of_a_digest_after_some_bytes_until_released(
        fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    data = bytes(range(256)) * 40
    digest = fake.add_blob("r", data)
    other = fake.add_blob("r", b"z" * 5000)
    fake.chunk_size = 1024
    hold = fake.hold(digest, after=1500)
    url = f"{fake.url}/v2/r/blobs/{digest}"
    async with session.get(url) as first, session.get(url) as second:
        await asyncio.wait_for(hold.reached(2), 5)  # both stopped after their first 1500 bytes
        assert hold.arrived == 2
        for r in (first, second):
            assert r.headers["Content-Length"] == str(len(data))
            assert await asyncio.wait_for(r.content.readexactly(1500), 5) == data[:1500]
        async with session.get(f"{fake.url}/v2/r/blobs/{other}") as r:  # other digests are not held
            assert await r.read() == b"z" * 5000
        async with session.head(url) as r:  # nor HEADs
            assert r.status == 200
        hold.release()
        assert [await first.read(), await second.read()] == [data[1500:]] * 2
    async with session.get(url) as r:  # once released, GETs pass
        assert await r.read() == data
    assert hold.arrived == 3


async def test_stall_before_headers_times_out(fake: FakeRegistry,
                                              session: aiohttp.ClientSession) -> None:
    fake.stall_before_headers = True
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(f"{fake.url}/v2/", timeout=aiohttp.ClientTimeout(total=0.1)):
            pass
    fake.stall_before_headers = False
    async with session.get(f"{fake.url}/v2/") as r:
        assert r.status == 200


async def test_drop_connection_truncates(fake: FakeRegistry,
                                         session: aiohttp.ClientSession) -> None:
    digest = fake.add_blob("r", b"y" * 10_000)
    fake.drop_connection, fake.chunk_size = True, 1000
    async with session.get(f"{fake.url}/v2/r/blobs/{digest}") as r:
        assert r.headers["Content-Length"] == "10000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
