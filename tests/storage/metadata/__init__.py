"""Shared by the metadata tests: digests, a media type, and a look at the database from outside."""
from __future__ import annotations

import sqlite3
from pathlib import Path

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def read(path: Path, sql: str, *args: object) -> list[tuple]:  # type: ignore[type-arg]
    """What another process would see on disk, bypassing every in-memory cache."""
    with sqlite3.connect(path) as db:
        return db.execute(sql, args).fetchall()
