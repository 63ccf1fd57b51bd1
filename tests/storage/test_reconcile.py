"""Start-up reconciliation: rows without files go, verified orphan files are adopted, lying files are removed."""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.storage.filestore import FileStore
from mirror.storage.metadata import Metadata, TagRow
from mirror.storage import reconcile as reconcile_module
from mirror.storage.reconcile import reconcile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path / "data")
    store.prepare()
    return store


@pytest.fixture
async def metadata(store: FileStore) -> AsyncIterator[Metadata]:
    md = Metadata(store.root / "index.db")
    await md.open()
    yield md
    await md.close()


async def test_agreeing_rows_and_files_are_left_alone(store: FileStore, metadata: Metadata) -> None:
    data = b"layer"
    store.put(_digest(data), data)
    await metadata.content.add(_digest(data), len(data), None, "blob", 100.0)
    await metadata.links.add("docker.io", "library/app", [_digest(data)])
    assert await reconcile(store, metadata) == (0, 0)
    assert await metadata.content.sizes() == {_digest(data): len(data)}
    assert await metadata.links.contains("docker.io", "library/app", _digest(data))
    assert store.read(_digest(data)) == data


async def test_rows_whose_files_are_gone_are_dropped(store: FileStore, metadata: Metadata) -> None:
    kept, gone = b"kept", b"gone"
    store.put(_digest(kept), kept)
    await metadata.content.add(_digest(kept), len(kept), None, "blob", 100.0)
    await metadata.content.add(_digest(gone), len(gone), MANIFEST, "manifest", 100.0)  # its file was deleted
    await metadata.links.add("docker.io", "library/app", [_digest(gone)])
    await metadata.tags.put(TagRow("docker.io", "library/app", "latest", _digest(gone), MANIFEST, 100.0, 700.0))
    assert await reconcile(store, metadata) == (1, 0)
    assert await metadata.content.sizes() == {_digest(kept): len(kept)}
    assert not await metadata.links.contains("docker.io", "library/app", _digest(gone))
    assert await metadata.tags.get("docker.io", "library/app", "latest") is None


async def test_verified_orphan_files_are_adopted(store: FileStore, metadata: Metadata) -> None:
    data = b"x" * 5000  # written and renamed, then the process died before its row
    store.put(_digest(data), data)
    assert await reconcile(store, metadata) == (0, 1)
    assert await metadata.content.sizes() == {_digest(data): 5000}
    row = await metadata.content.get(_digest(data))
    assert row is not None and row.kind == "blob"
    assert store.read(_digest(data)) == data
    assert await reconcile(store, metadata) == (0, 0)  # and it stays adopted


async def test_files_whose_content_does_not_match_their_name_are_deleted(
        store: FileStore, metadata: Metadata) -> None:
    claimed = _digest(b"what the name promises")
    path = store.path(claimed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"something else entirely")
    good = b"good"
    store.put(_digest(good), good)
    assert await reconcile(store, metadata) == (0, 1)
    assert not path.exists()
    assert await metadata.content.get(claimed) is None
    assert await metadata.content.sizes() == {_digest(good): len(good)}


async def test_stray_files_beside_content_do_not_stop_the_start(store: FileStore, metadata: Metadata) -> None:
    (store.content_dir / "README").write_text("stray")
    (store.content_dir / "ab" / ("ab" * 32)).mkdir(parents=True)  # a directory with a digest's name
    data = b"orphan"
    store.put(_digest(data), data)
    assert await reconcile(store, metadata) == (0, 1)
    assert await metadata.content.sizes() == {_digest(data): len(data)}
    assert (store.content_dir / "README").exists()


async def test_an_orphan_signed_schema1_manifest_is_adopted_as_a_manifest(
        store: FileStore, metadata: Metadata) -> None:
    body = (Path(__file__).parent.parent / "data" / "schema1-signed.json").read_bytes()
    digest = "sha256:bff08d8da5a030fc39fdfcddd533fac4bc76d877d1a33bc336f8115e18d9081b"  # of its payload
    assert _digest(body) != digest
    store.put(digest, body)
    assert await reconcile(store, metadata) == (0, 1)
    row = await metadata.content.get(digest)
    assert row is not None and row.kind == "manifest"
    assert row.media_type == "application/vnd.docker.distribution.manifest.v1+prettyjws"
    assert store.read(digest) == body


async def test_an_orphan_manifest_is_adopted_with_its_media_type(store: FileStore, metadata: Metadata) -> None:
    body = b'{"schemaVersion": 2, "mediaType": "%s", "config": {}, "layers": []}' % MANIFEST.encode()
    store.put(_digest(body), body)
    assert await reconcile(store, metadata) == (0, 1)
    row = await metadata.content.get(_digest(body))
    assert row is not None and (row.kind, row.media_type) == ("manifest", MANIFEST)


@pytest.mark.parametrize("one_pass", [reconcile_module.ONE_PASS, 0], ids=["whole", "by shard"])
async def test_every_shard_is_reconciled_and_misplaced_files_are_not_taken(
    store: FileStore, metadata: Metadata, monkeypatch: pytest.MonkeyPatch, one_pass: int
) -> None:
    """A large store is reconciled a shard (two hex digits) at a time: none is skipped, none leaks into another."""
    monkeypatch.setattr(reconcile_module, "ONE_PASS", one_pass)
    blobs = [f"blob {i}".encode() for i in range(1500)]  # every one of the 256 shards, most more than once
    assert len({_digest(b)[7:9] for b in blobs}) == 256
    for i, data in enumerate(blobs):
        if i % 3 != 1:
            store.put(_digest(data), data)  # i % 3 == 1: a row whose file is gone
        if i % 3 != 2:
            await metadata.content.add(_digest(data), len(data), None, "blob", 100.0)  # 2: a file without its row
    stray = b"misplaced"
    wrong = store.content_dir / ("00" if _digest(stray)[7:9] != "00" else "01") / _digest(stray)[7:]
    wrong.parent.mkdir(exist_ok=True)
    wrong.write_bytes(stray)
    assert await reconcile(store, metadata) == (500, 500)
    assert await metadata.content.sizes() == {_digest(b): len(b) for i, b in enumerate(blobs) if i % 3 != 1}
    assert await metadata.content.sizes(_digest(blobs[0])[7:9]) == {
        _digest(b): len(b) for i, b in enumerate(blobs) if i % 3 != 1 and _digest(b)[7:9] == _digest(blobs[0])[7:9]}
    assert wrong.exists() and _digest(stray) not in await metadata.content.sizes()
