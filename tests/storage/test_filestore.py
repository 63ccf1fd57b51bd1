"""FileStore: paths only from valid digests; FileWriter publishes only verified bytes."""
from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import pytest

from mirror.storage.filestore import FileStore
from mirror.storage.store import BlobWriter, ContentStore, DigestMismatch

DATA = os.urandom(10_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path / "data")
    store.prepare()
    return store


def _tmp_files(store: FileStore) -> list[Path]:
    return list(store.tmp_dir.iterdir())


def test_path_is_derived_from_the_digest(store: FileStore) -> None:
    hexpart = DIGEST[7:]
    assert store.path(DIGEST) == store.root / "content" / "sha256" / hexpart[:2] / hexpart


@pytest.mark.parametrize("digest", [
    "sha256:../../etc/passwd",
    "sha256:" + "a" * 62 + "/..",
    "sha256:" + "../" * 21 + "a",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 64 + "\x00",
    "sha512:" + "a" * 128,
    "/etc/passwd",
    "",
])
def test_no_path_from_an_invalid_digest(store: FileStore, digest: str) -> None:
    with pytest.raises(ValueError, match="unvalidated digest"):
        store.path(digest)
    with pytest.raises(ValueError):
        store.writer(digest)
    with pytest.raises(ValueError):
        store.read(digest)
    assert _tmp_files(store) == []


def test_commit_publishes_verified_bytes(store: FileStore) -> None:
    writer = store.writer(DIGEST, len(DATA))
    writer.write(DATA[:3000])
    writer.write(memoryview(DATA)[3000:])
    assert store.size(DIGEST) is None  # nothing at the content path before commit
    assert len(_tmp_files(store)) == 1
    writer.commit()
    writer.close()
    assert store.read(DIGEST) == DATA
    assert store.size(DIGEST) == len(DATA)
    assert _tmp_files(store) == []
    assert store.digests() == [DIGEST]


def test_batches_of_pieces_are_written_and_hashed_in_order(store: FileStore) -> None:
    pieces = [DATA[i:i + 7] for i in range(0, len(DATA), 7)]  # many small pieces: several writev calls
    batch = [b"", *pieces[:2000], memoryview(b""), *pieces[2000:]]
    writer = store.writer(DIGEST, len(DATA))
    writer.hash(batch)
    writer.append(batch)
    assert writer.on_disk == writer.written == len(DATA)
    writer.commit()
    writer.close()
    assert store.read(DIGEST) == DATA


def test_commit_without_a_known_size_checks_the_digest(store: FileStore) -> None:
    writer = store.writer(DIGEST)
    writer.write(DATA)
    writer.commit()
    writer.close()
    assert store.read(DIGEST) == DATA


@pytest.mark.parametrize(("data", "size", "why"), [
    (DATA[:-1], len(DATA), "expected 10000 bytes, got 9999"),  # truncated
    (DATA + b"x", len(DATA), "expected 10000 bytes, got 10001"),
    (bytes([DATA[0] ^ 1]) + DATA[1:], len(DATA), "content hashes to"),  # same size, one bit flipped
    (b"", None, "content hashes to"),
])
def test_mismatch_leaves_nothing_anywhere(store: FileStore, data: bytes, size: int | None, why: str) -> None:
    writer = store.writer(DIGEST, size)
    writer.write(data)
    with pytest.raises(DigestMismatch, match=why):
        writer.commit()
    writer.close()
    assert not store.path(DIGEST).exists()
    assert store.read(DIGEST) is None
    assert _tmp_files(store) == []


def test_put_refuses_bytes_that_do_not_match(store: FileStore) -> None:
    with pytest.raises(DigestMismatch):
        store.put(DIGEST, b"something else")
    assert store.size(DIGEST) is None
    assert _tmp_files(store) == []
    store.put(DIGEST, DATA)
    assert store.read(DIGEST) == DATA


def test_abandoned_writer_leaves_nothing(store: FileStore) -> None:
    writer = store.writer(DIGEST, len(DATA))
    writer.write(DATA)
    writer.close()  # e.g. the upstream connection dropped before the end
    assert store.size(DIGEST) is None
    assert _tmp_files(store) == []


def test_prepare_empties_tmp_and_keeps_content(store: FileStore) -> None:
    store.put(DIGEST, DATA)
    writer = store.writer(DIGEST, len(DATA))  # a write in progress when the process died
    writer.write(DATA[:100])
    (store.tmp_dir / "leftover").write_bytes(b"partial")
    assert len(_tmp_files(store)) == 2
    FileStore(store.root).prepare()
    assert _tmp_files(store) == []
    assert store.read(DIGEST) == DATA
    writer.close()


def test_prepare_creates_the_layout(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "fresh")
    store.prepare()
    assert store.content_dir.is_dir() and store.tmp_dir.is_dir()
    assert store.digests() == []


def test_remove(store: FileStore) -> None:
    store.put(DIGEST, DATA)
    store.remove(DIGEST)
    assert store.size(DIGEST) is None
    store.remove(DIGEST)  # already gone: fine


def test_digests_ignores_files_that_are_not_content(store: FileStore) -> None:
    store.put(DIGEST, DATA)
    other = "b" * 64
    wrong = next(d for d in ("cc", "ce") if d != DIGEST[7:9])  # DIGEST is random: not its directory
    (store.content_dir / wrong).mkdir()
    (store.content_dir / wrong / other).write_bytes(b"misplaced")  # wrong 2-hex directory
    (store.content_dir / wrong / "notes.txt").write_text("hi")
    (store.content_dir / DIGEST[7:9] / (DIGEST[7:] + ".part")).write_bytes(b"x")
    (store.content_dir / "README").write_text("a stray file, not a directory")
    (store.content_dir / "dd" / ("d" * 64)).mkdir(parents=True)  # a directory with a digest name
    assert store.digests() == [DIGEST]


def test_open_gives_the_stored_bytes_even_after_removal(store: FileStore) -> None:
    assert store.open(DIGEST) is None
    store.put(DIGEST, DATA)
    file = store.open(DIGEST)
    assert file is not None
    with file:
        store.remove(DIGEST)  # evicted while being sent
        assert os.fstat(file.fileno()).st_size == len(DATA)
        assert file.read() == DATA


def test_a_write_in_progress_is_readable_by_its_temp_name_as_it_grows(store: FileStore) -> None:
    writer = store.writer(DIGEST, len(DATA))
    with writer.open_written() as own, store.open_temp(writer.temp_name) as follower:
        writer.write(DATA[:100])
        assert os.pread(own.fileno(), 1000, 0) == DATA[:100]
        writer.write(DATA[100:])
        assert follower.read() == DATA
        writer.commit()
        writer.close()
    with pytest.raises(FileNotFoundError):
        store.open_temp(writer.temp_name)  # committed: renamed away


@pytest.mark.parametrize("name", ["", ".", "..", "../index.db", "/etc/passwd", "sub/name"])
def test_open_temp_refuses_names_that_are_not_a_temp_file(store: FileStore, name: str) -> None:
    with pytest.raises(OSError, match="unexpected temp file name"):
        store.open_temp(name)


def test_remove_temp_files_keeps_the_named_ones(store: FileStore) -> None:
    running = store.writer(DIGEST, len(DATA))
    (store.tmp_dir / "leftover").write_bytes(b"partial")
    assert store.remove_temp_files({running.temp_name}) == 1
    assert [p.name for p in _tmp_files(store)] == [running.temp_name]
    running.close()


def test_the_file_store_is_a_content_store(store: FileStore) -> None:
    """Every member the Protocols name, with the same parameters (a structural check at run time)."""
    as_protocol: ContentStore = store  # and for a type checker
    writer: BlobWriter = as_protocol.writer(DIGEST)
    for protocol, implementation in ((ContentStore, store), (BlobWriter, writer)):
        for name, member in vars(protocol).items():
            if name.startswith("_") or not callable(member):
                continue
            assert inspect.signature(getattr(implementation, name)).parameters.keys() == \
                inspect.signature(member).parameters.keys() - {"self"}, name
        for name in protocol.__annotations__:
            assert hasattr(implementation, name), name
    writer.close()
