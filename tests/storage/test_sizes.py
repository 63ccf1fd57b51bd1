"""Blob sizes from the descriptors of cached manifests."""
from __future__ import annotations

import json
from pathlib import Path

from mirror.storage.filestore import FileStore
from mirror.storage.metadata import Metadata
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
    store = FileStore(tmp_path)
    store.prepare()
    metadata = Metadata(tmp_path / "index.db")
    await metadata.open()
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"digest": CONFIG, "size": 7}, "layers": [{"digest": LAYER, "size": 1234}]}).encode()
    manifest = digest_of(body)
    store.put(manifest, body)
    await metadata.content.add(manifest, len(body), None, "manifest", 1.0)
    await metadata.links.add("docker.io", "library/app", [manifest, CONFIG, LAYER])
    assert await descriptor_size(metadata, store, "docker.io", "library/other", LAYER) is None
    assert await descriptor_size(metadata, store, "docker.io", "library/app", LAYER) == 1234
    assert await descriptor_size(metadata, store, "docker.io", "library/app", CONFIG) == 7
    assert await metadata.descriptors.undescribed("docker.io", "library/app") == []  # read once
    assert await descriptor_size(metadata, store, "docker.io", "library/app", CHILD) is None
    await metadata.drop_content([manifest])  # evicted: its descriptors go with it
    assert await descriptor_size(metadata, store, "docker.io", "library/app", LAYER) is None
    await metadata.close()

