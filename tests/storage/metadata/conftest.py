from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.storage.metadata import Metadata


@pytest.fixture
async def metadata(tmp_path: Path) -> AsyncIterator[Metadata]:
    """A metadata database on a real SQLite file."""
    md = Metadata(tmp_path / "index.db")
    await md.open()
    yield md
    await md.close()
