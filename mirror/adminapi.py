"""`/admin/`: cache maintenance for the command line, against a running mirror.

Callers on loopback are trusted; anyone else needs `Authorization: Bearer
<server.admin_token>`, and with no token configured the API is loopback-only.
"""
from __future__ import annotations

import hmac
import ipaddress
import json

from aiohttp import web

from mirror.cache.admin import AdminError, CacheAdmin
from mirror.config import parse_duration
from mirror.errors import NeedsPrimary, RegistryError
from mirror.requestinfo import client_address

ADMIN = web.AppKey("admin", CacheAdmin)
ADMIN_TOKEN = web.AppKey("admin_token", str)


def _authorize(request: web.Request) -> None:
    remote = client_address(request) or ""
    try:
        if ipaddress.ip_address(remote).is_loopback:
            return
    except ValueError:
        pass
    token = request.app[ADMIN_TOKEN]
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not token:
        raise RegistryError("DENIED", 403, "the admin API answers only on loopback (set server.admin_token to open it)")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise RegistryError("UNAUTHORIZED", 401, "admin API: missing or wrong bearer token")


async def _body(request: web.Request) -> dict[str, object]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise RegistryError("UNSUPPORTED", 400, "admin API: the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise RegistryError("UNSUPPORTED", 400, "admin API: the body must be a JSON object")
    return body


async def _run(request: web.Request, op: str) -> web.Response:
    _authorize(request)
    admin = request.app[ADMIN]
    body = await _body(request)
    try:
        if op == "stats":
            result = await admin.stats()
        elif op == "pin":
            result = await admin.pin(str(body.get("ref", "")))
        elif op == "unpin":
            result = await admin.unpin(str(body.get("ref", "")))
        elif op == "purge":
            older = body.get("older_than")
            result = await admin.purge(
                image=body.get("ref"), repo=body.get("repo"),  # type: ignore[arg-type]
                older_than=parse_duration(older) if older is not None else None,
            )
        else:
            result = await admin.gc()
    except (AdminError, ValueError) as exc:
        raise RegistryError("UNSUPPORTED", 400, str(exc)) from None
    return web.json_response(result)


def setup(app: web.Application, admin: CacheAdmin, token: str) -> None:
    app[ADMIN] = admin
    app[ADMIN_TOKEN] = token
    app.router.add_get("/admin/stats", lambda r: _run(r, "stats"))
    for op in ("pin", "unpin", "purge", "gc"):
        app.router.add_post(f"/admin/{op}", lambda r, op=op: _run(r, op))


def setup_forwarding(app: web.Application) -> None:
    """In a secondary worker, every admin request goes to the primary, which runs eviction and fetches."""

    async def to_primary(request: web.Request) -> web.StreamResponse:
        raise NeedsPrimary()

    app.router.add_route("*", "/admin/{op:.*}", to_primary)
