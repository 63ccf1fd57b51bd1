"""Blob sizes from the descriptors of cached manifests, and the schema upgrade that keeps them."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from mirror.storage.blobs import ContentStore
from mirror.storage.metadata import SCHEMA_VERSION, Metadata
from mirror.manifest import descriptor_sizes
from mirror.storage.sizes import descriptor_size
from tests.fakes.registry import digest_of

LAYER = "sha256:" + "1" * 64
CONFIG = "sha256:" + "2" * 64
CHILD = "sha256:" + "3" * 64


def test_descriptor_sizes_of_manifests_and_indexes() -> None:
    manifest = json.dumps({"config": {"digest": CONFIG, "size": 7},
                           "layers": [{"digest": LAYER, "size": 1234}, {"digest": "sha256:bad", "size": 1},
                                      {"digest": CHILD, "size": "12"}, {"digest": CHILD, "size": True}, "junk"]})
    assert descriptor_sizes(manifest.encode()) == {CONFIG: 7, LAYER: 1234}
    assert descriptor_sizes(json.dumps({"manifests": [{"digest": CHILD, "size": 99}]}).encode()) == {CHILD: 99}
    for junk in (b"not json", b"[]", b'{"layers": 3}', b'{"schemaVersion": 1, "fsLayers": []}'):
        assert descriptor_sizes(junk) == {}


async def test_sizes_come_only_from_manifests_linked_to_the_repository(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    store.prepare()
    metadata = Metadata(tmp_path / "index.db")
    await metadata.open()
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"digest": CONFIG, "size": 7}, "layers": [{"digest": LAYER, "size": 1234}]}).encode()
    manifest = digest_of(body)
    store.put(manifest, body)
    await metadata.add_content(manifest, len(body), None, "manifest", 1.0)
    await metadata.link("docker.io", "library/app", [manifest, CONFIG, LAYER])
    assert await descriptor_size(metadata, store, "docker.io", "library/other", LAYER) is None
    assert await descriptor_size(metadata, store, "docker.io", "library/app", LAYER) == 1234
    assert await descriptor_size(metadata, store, "docker.io", "library/app", CONFIG) == 7
    assert await metadata.undescribed_manifests("docker.io", "library/app") == []  # read once
    assert await descriptor_size(metadata, store, "docker.io", "library/app", CHILD) is None
    await metadata.drop_content([manifest])  # evicted: its descriptors go with it
    assert await descriptor_size(metadata, store, "docker.io", "library/app", LAYER) is None
    await metadata.close()


async def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with sqlite3.connect(path) as db:  # the shape version 1 left
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute("CREATE TABLE content (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,"
                   " kind TEXT NOT NULL, created_at REAL NOT NULL, last_access REAL NOT NULL,"
                   " pinned INTEGER NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO content VALUES (?, 5, NULL, 'blob', 1, 1, 0)", (LAYER,))
    metadata = Metadata(path)
    await metadata.open()
    assert SCHEMA_VERSION == 2
    assert await metadata.get_content(LAYER) is not None and metadata.size == 5
    await metadata.add_descriptors(CHILD, {LAYER: 5})
    await metadata.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert db.execute("SELECT * FROM descriptors").fetchall() == [(CHILD, LAYER, 5)]
