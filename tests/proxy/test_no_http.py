"""The services answer in domain terms: mirror/proxy builds no HTTP response and knows no worker."""
from __future__ import annotations

import ast
from pathlib import Path

import mirror.proxy

# the server side of HTTP, and the modules built on it (responses, per-request facts, workers)
FORBIDDEN = ("aiohttp.web", "mirror.responses", "mirror.routes", "mirror.requestinfo", "mirror.observe",
             "mirror.workers", "mirror.app")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_services_import_nothing_of_the_http_server_side() -> None:
    found = {
        f"{path.name}: {name}"
        for path in Path(mirror.proxy.__file__).parent.glob("*.py")
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not found
