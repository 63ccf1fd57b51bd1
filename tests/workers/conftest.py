"""Fixtures for tests of worker groups."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import values


@pytest.fixture
def multiprocess_values(tmp_path: Path) -> Iterator[str]:
    """Workers keep metric values in files; undo that for the tests that follow."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    saved = values.ValueClass
    yield str(directory)
    values.ValueClass = saved
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
