"""`/admin/`: cache maintenance for the command line, against a running mirror.

`GET /admin/stats`, and `POST /admin/{pin,unpin,purge,gc}` with a JSON object of
arguments (see mirror.cache.admin.perform); each answers a JSON object, or an OCI
error body. Two ways in:

- the admin socket (`<data_dir>/admin.sock`, see mirror.adminsocket) serves `/admin/`
  and nothing else, to whoever can open it: its mode (0600) is the check;
- over TCP, the same paths answer only `Authorization: Bearer <server.admin_token>`,
  and with no token configured they answer 403, naming the socket.

A client's address grants nothing: behind a same-host reverse proxy or sidecar,
every client comes from loopback.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
from pathlib import Path
from typing import Callable

from aiohttp import web

from mirror.cache.admin import OPERATIONS, AdminError, CacheAdmin, perform
from mirror.errors import NeedsPrimary, RegistryError
from mirror.server import MirrorRunner, error_middleware

log = logging.getLogger("mirror.admin")

ADMIN = web.AppKey("admin", CacheAdmin)

Authorize = Callable[[web.Request], None]  # raises RegistryError to refuse


def setup(app: web.Application, admin: CacheAdmin, token: str, socket_path: Path) -> None:
    """Serve `/admin/` on the mirror's TCP application to callers that send `token`."""
    app[ADMIN] = admin
    _add_routes(app, _bearer(token, socket_path))


def setup_forwarding(app: web.Application) -> None:
    """In a secondary worker, every admin request goes to the primary, which runs eviction and fetches.

    The request goes whole, `Authorization` included: the primary checks the token.
    """

    async def to_primary(request: web.Request) -> web.StreamResponse:
        raise NeedsPrimary()

    app.router.add_route("*", "/admin/{op:.*}", to_primary)


async def serve_socket(admin: CacheAdmin, sock: socket.socket, shutdown_timeout: float) -> web.AppRunner:
    """Serve `/admin/` alone on the listening unix socket `sock`; stop it with the runner's `cleanup`."""
    app = web.Application(middlewares=[error_middleware])
    app[ADMIN] = admin
    _add_routes(app, lambda request: None)  # who may open the socket was decided by its mode
    runner = MirrorRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def _bearer(token: str, socket_path: Path) -> Authorize:
    def authorize(request: web.Request) -> None:
        if not token:
            raise RegistryError(
                "DENIED", 403,
                f"the admin API is served on the unix socket {socket_path} (`mirror cache …` on the mirror's host, "
                "as its user, uses it); set server.admin_token to open it over TCP as well")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), token.encode()):
            raise RegistryError("UNAUTHORIZED", 401, "admin API: missing or wrong bearer token (server.admin_token)",
                                headers={"WWW-Authenticate": 'Bearer realm="mirror admin"'})

    return authorize


def _add_routes(app: web.Application, authorize: Authorize) -> None:
    for op, operation in OPERATIONS.items():
        async def handle(request: web.Request, op: str = op) -> web.Response:
            authorize(request)
            return await _run(request, op)

        if operation.changes:
            app.router.add_post(f"/admin/{op}", handle)
        else:
            app.router.add_get(f"/admin/{op}", handle)


async def _run(request: web.Request, op: str) -> web.Response:
    changes = OPERATIONS[op].changes
    arguments = await _arguments(request) if changes else {}
    try:
        result = await perform(request.app[ADMIN], op, arguments)
    except AdminError as exc:
        raise RegistryError("UNSUPPORTED", 400, str(exc)) from None
    if changes:
        log.info("admin %s %s: %s", op, json.dumps(arguments), json.dumps(result))
    return web.json_response(result)


async def _arguments(request: web.Request) -> dict[str, object]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RegistryError("UNSUPPORTED", 400, "admin API: the body must be a JSON object")
    return body
