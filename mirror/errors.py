"""OCI errors: the codes, the domain error that carries one, and the JSON body every failure
a client sees is rendered as (`server.error_middleware` renders them, once)."""
from __future__ import annotations

import json

from aiohttp import web

class RegistryError(Exception):
    """A failure with an OCI error code, an HTTP status and a message for the client."""

    def __init__(
        self,
        code: str,
        status: int,
        message: str,
        detail: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}


class NeedsPrimary(Exception):
    """Raised in a secondary worker by whatever would reach an upstream or write content.

    Secondaries serve what the cache holds; everything else is handed, whole, to
    the primary worker, so fetches, their coalescing and eviction live in one process.
    """


def name_invalid(name: str, why: str) -> RegistryError:
    return RegistryError("NAME_INVALID", 400, f"invalid repository name {name!r}: {why}")


def digest_invalid(digest: str, why: str) -> RegistryError:
    return RegistryError("DIGEST_INVALID", 400, f"invalid digest {digest!r}: {why}")


def unsupported(message: str) -> RegistryError:
    return RegistryError("UNSUPPORTED", 405, message)


def error_body(code: str, message: str, detail: object = None) -> bytes:
    err: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}).encode()


def error_response(err: RegistryError) -> web.Response:
    return web.Response(
        status=err.status,
        body=error_body(err.code, err.message, err.detail),
        content_type="application/json",
        headers=err.headers,
    )


HTTP_CODES = {  # the OCI code of an error that has only an HTTP status
    400: "UNSUPPORTED",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NAME_UNKNOWN",
    405: "UNSUPPORTED",
    416: "RANGE_INVALID",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}
