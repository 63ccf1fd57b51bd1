"""The data directory's secret: created once (0600), read back the same, refused when unsafe;
and what it keys: fingerprints in index.db nobody can check a password against, tokens that
outlive a restart."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from mirror.app import make_app
from mirror.storage.secret import SECRET_BYTES, SecretError, data_dir_secret, derive
from mirror.upstream.credentials import Fingerprinter, basic_authorization
from tests.conftest import FakeClock, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT


def test_created_private_and_read_back_the_same(tmp_path: Path) -> None:
    first = data_dir_secret(tmp_path)
    assert len(first) == SECRET_BYTES
    assert os.stat(tmp_path / "secret").st_mode & 0o777 == 0o600
    assert data_dir_secret(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["secret"], "no temporary file is left behind"


def test_concurrent_starters_agree_on_one_secret(tmp_path: Path) -> None:
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(data_dir_secret(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 8


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_others_can_read_is_refused_and_left_alone(tmp_path: Path, mode: int) -> None:
    data_dir_secret(tmp_path)
    os.chmod(tmp_path / "secret", mode)
    before = (tmp_path / "secret").read_bytes()
    with pytest.raises(SecretError, match=f"mode 0{mode:o}.*chmod 600"):
        data_dir_secret(tmp_path)
    assert (tmp_path / "secret").read_bytes() == before


@pytest.mark.parametrize("size", [0, 16, 31, 33, 4096])
def test_a_secret_of_the_wrong_size_is_refused_and_left_alone(tmp_path: Path, size: int) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x" * size)
    os.chmod(path, 0o600)
    with pytest.raises(SecretError, match=f"holds {size} bytes"):
        data_dir_secret(tmp_path)
    assert path.read_bytes() == b"x" * size


def test_a_directory_or_symlink_in_its_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "secret").mkdir()
    with pytest.raises(SecretError, match="not a regular file"):
        data_dir_secret(tmp_path / "a")
    (tmp_path / "b").mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"y" * SECRET_BYTES)
    os.chmod(target, 0o600)
    (tmp_path / "b" / "secret").symlink_to(target)
    with pytest.raises(SecretError, match="not a regular file"):
        data_dir_secret(tmp_path / "b")


def test_derived_keys_differ_by_purpose_and_by_secret() -> None:
    one, two = b"1" * 32, b"2" * 32
    assert derive(one, "fingerprint") != derive(one, "tokens")
    assert derive(one, "fingerprint") != derive(two, "fingerprint")
    assert derive(one, "tokens") == derive(one, "tokens")


async def test_index_db_holds_no_fingerprint_computable_without_the_key(
    fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client,  # type: ignore[no-untyped-def]
) -> None:
    fake_registry.users = {"alice": "hunter2"}
    fake_registry.add_image("library/alpine", "3", 1)
    data_dir = tmp_path / "data"
    assert fake_registry.url
    app = make_app(mirror_config(fake_registry.url, data_dir), clock=FakeClock())
    client = await aiohttp_client(app)
    alice = basic_authorization("alice", "hunter2")
    resp = await client.get("/v2/library/alpine/manifests/3", headers={**ACCEPT, "Authorization": alice})
    assert resp.status == 200
    await client.close()  # flushes the decisions batched in memory

    rows = sqlite3.connect(data_dir / "index.db").execute("SELECT principal FROM access").fetchall()
    principals = {r[0] for r in rows} - {"anonymous"}
    key = derive(data_dir_secret(data_dir), "fingerprint")
    assert principals == {Fingerprinter(key).credentials("alice", "hunter2").fingerprint}
    unkeyed = hashlib.sha256(b"alice\0hunter2").hexdigest()
    everything = b"".join((data_dir / name).read_bytes() for name in os.listdir(data_dir) if name.startswith("index.db"))
    for guessable in (unkeyed, unkeyed[:16], "hunter2"):
        assert guessable.encode() not in everything


async def test_mirror_tokens_keep_working_after_a_restart(
    fake_registry: FakeRegistry, tmp_path: Path, aiohttp_client,  # type: ignore[no-untyped-def]
) -> None:
    fake_registry.users = {"alice": "hunter2"}
    fake_registry.add_image("library/alpine", "3", 1)
    data_dir = tmp_path / "data"
    assert fake_registry.url
    first = await aiohttp_client(make_app(mirror_config(fake_registry.url, data_dir)))
    resp = await first.get("/token", params={"scope": "repository:library/alpine:pull"},
                           headers={"Authorization": basic_authorization("alice", "hunter2")})
    assert resp.status == 200
    token = (await resp.json())["token"]
    await first.close()

    restarted = await aiohttp_client(make_app(mirror_config(fake_registry.url, data_dir)))
    resp = await restarted.get("/v2/library/alpine/manifests/3", headers={**ACCEPT, "Authorization": f"Bearer {token}"})
    assert resp.status == 200
    other_dir = await aiohttp_client(make_app(mirror_config(fake_registry.url, tmp_path / "other")))
    resp = await other_dir.get("/v2/library/alpine/manifests/3", headers={**ACCEPT, "Authorization": f"Bearer {token}"})
    assert resp.status == 401, "another data directory's key cannot read it"
