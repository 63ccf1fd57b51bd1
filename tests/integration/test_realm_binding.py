"""Realm binding against the real registry: its token server runs on another host (127.0.0.2),
as Docker Hub's does, and counts whose credentials reached it.

Credentials of every kind (a client's, by skopeo; the service account's) stay home until the
operator lists that host in `token_realms`; anonymous pulls work throughout.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.token_server import ANONYMOUS, TokenServer
from tests.integration.clients import ClientError, Skopeo
from tests.integration.images import push_image
from tests.integration.mirror_process import MirrorProcess, mirrors
from tests.integration.registry import UpstreamRegistry, random_repo, registry_behind

pytestmark = pytest.mark.integration

REALM_HOST = "127.0.0.2"
ALICE = ("alice", "alice-password")
SERVICE_ACCOUNT = ("svc", "svc-password")


@pytest.fixture(scope="module")
def foreign_realm_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    token_server = TokenServer(users=dict([ALICE, SERVICE_ACCOUNT]))
    with registry_behind(token_server, tmp_path_factory.mktemp("foreign-realm"), REALM_HOST) as registry:
        yield registry


@pytest.fixture
def mirror_at(tmp_path: Path, foreign_realm_registry: UpstreamRegistry) -> Iterator[Callable[[str], MirrorProcess]]:
    with mirrors(tmp_path, foreign_realm_registry.url) as start:
        yield lambda extra: start(extra=extra)


def credentialed(server: TokenServer) -> set[str]:
    return {r.principal for r in server.requests} - {ANONYMOUS}


def test_credentials_never_reach_a_realm_on_another_host_until_it_is_listed(
    foreign_realm_registry: UpstreamRegistry, mirror_at: Callable[[str], MirrorProcess], skopeo_client: Skopeo,
) -> None:
    server = foreign_realm_registry.token_server
    public, private = random_repo(), random_repo()
    image = push_image(foreign_realm_registry, public, "v1")
    secret_image = push_image(foreign_realm_registry, private, "v1")
    server.private[private] = {ALICE[0]}
    server.requests.clear()

    mirror = mirror_at("")
    with pytest.raises(ClientError):
        skopeo_client.pull(mirror.host, private, "v1", creds=ALICE)
    assert "token_realms" in mirror.log.read_text(), "the refusal is logged with the setting that allows it"
    assert skopeo_client.pull(mirror.host, public, "v1") == image.digest, "anonymous pulls still work"

    with_account = mirror_at(f'username = "{SERVICE_ACCOUNT[0]}"\npassword = "{SERVICE_ACCOUNT[1]}"\n')
    with pytest.raises(ClientError):
        skopeo_client.pull(with_account.host, public, "v1")
    assert credentialed(server) == set(), "no credential of any kind reached the foreign realm"

    trusting = mirror_at(f'token_realms = ["{REALM_HOST}"]\n')
    assert skopeo_client.pull(trusting.host, private, "v1", creds=ALICE) == secret_image.digest
    assert credentialed(server) == {ALICE[0]}
