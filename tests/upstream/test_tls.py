"""Upstream TLS: verified by default, a private CA by `ca_file`, and an explicit opt-out."""
from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mirror.app import make_app
from tests.conftest import FakeClock, Mirror, mirror_config
from tests.fakes.registry import FakeRegistry
from tests.proxy.test_manifests import ACCEPT
from tests.fakes.certs import self_signed


@pytest.fixture
async def tls_registry(tmp_path: Path) -> tuple[FakeRegistry, Path]:
    cert, key = self_signed(tmp_path, "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    registry = FakeRegistry()
    await registry.start(context)
    registry.add_image("library/alpine", "3", 1)
    yield registry, cert
    await registry.close()


async def _mirror(aiohttp_client, registry: FakeRegistry, tmp_path: Path, **settings: object) -> Mirror:  # type: ignore[no-untyped-def]
    assert registry.url and registry.url.startswith("https://")
    app = make_app(mirror_config(registry.url, tmp_path / "data", **settings), clock=FakeClock())
    return Mirror(await aiohttp_client(app), FakeClock(), app, tmp_path / "data")


async def test_untrusted_certificate_is_refused_with_a_clear_error(aiohttp_client, tls_registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, _ = tls_registry
    mirror = await _mirror(aiohttp_client, registry, tmp_path)
    resp = await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)
    assert resp.status == 503
    assert "certificate" in (await resp.json())["errors"][0]["message"]
    assert registry.count(kind="manifest") == 0


async def test_ca_file_trusts_a_private_ca(aiohttp_client, tls_registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, cert = tls_registry
    mirror = await _mirror(aiohttp_client, registry, tmp_path, ca_file=str(cert))
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200


async def test_insecure_skip_verify_is_an_explicit_opt_out(aiohttp_client, tls_registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, _ = tls_registry
    mirror = await _mirror(aiohttp_client, registry, tmp_path, insecure_skip_verify=True)
    assert (await mirror.client.get("/v2/library/alpine/manifests/3", headers=ACCEPT)).status == 200
