"""Services answer in domain terms and responses shape them: neither reaches up the layers.

mirror/proxy builds no HTTP response and knows no worker; mirror/responses is used by
the handlers and the workers, and uses neither.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mirror

# above the services: the server side of HTTP and what is built on it
ABOVE_PROXY = ("aiohttp.web", "mirror.responses", "mirror.routes", "mirror.requestinfo", "mirror.observe",
               "mirror.workers", "mirror.app")
ABOVE_RESPONSES = ("mirror.routes", "mirror.workers", "mirror.app")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package, forbidden", [("proxy", ABOVE_PROXY), ("responses", ABOVE_RESPONSES)])
def test_a_layer_imports_nothing_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    found = {
        f"{path.name}: {name}"
        for path in (Path(mirror.__file__).parent / package).glob("*.py")
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not found
