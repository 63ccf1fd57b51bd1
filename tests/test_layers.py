"""The layers of DESIGN.md hold: the import-linter contracts in pyproject.toml are all kept,
and the services build no HTTP response (import-linter sees packages, not `aiohttp.web`)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

import mirror

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    status = lint_imports(config_filename=os.fspath(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "BROKEN" not in out and out.count("KEPT") >= 5


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_services_build_no_http_response() -> None:
    found = {
        f"{path.name}: {name}"
        for path in (Path(mirror.__file__).parent / "proxy").glob("*.py")
        for name in _imports(path)
        if name == "aiohttp.web" or name.startswith("aiohttp.web.") or name.startswith("aiohttp.web_")
    }
    assert not found
