"""The HTTP server: aiohttp's, with every error it answers as an OCI error body.

`error_middleware` turns the application's errors (domain errors, aiohttp's HTTP exceptions,
crashes) into OCI JSON bodies.

A request aiohttp cannot parse (a malformed request line, an invalid method, a header
over the size limit) never reaches the application or its middlewares: aiohttp's
connection handler answers it with a plain-text 400 itself. `RequestHandler.handle_error`
is where it does, so the mirror's servers make their connections with a subclass that
renders those answers — and any other the connection handler makes — as OCI JSON.
Every server the mirror runs (one process, each worker, the tests' raw-socket server)
is built by `MirrorRunner`.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from typing import Any, Callable

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from mirror.errors import HTTP_CODES, NeedsPrimary, RegistryError, error_response
from mirror.requestinfo import RESULT

log = logging.getLogger("mirror")


class OciRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with OCI error bodies."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None,
    ) -> web.StreamResponse:
        """`{"errors": [{"code", "message"}]}` with the status aiohttp chose, closing the connection.

        Raises ConnectionError, as aiohttp does, when a response is already under way. A refused
        request is logged at debug level (the access log has its line); a crash with its traceback.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way: cannot send an error instead")
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal error; see the mirror's log"
        else:
            text = f"malformed request: {_why(exc)}"
            self.logger.debug("refused a request from %s: %s", request.remote, message)
        response = error_response(RegistryError(HTTP_CODES.get(status, "UNKNOWN"), status, text))
        response.force_close()
        return response


def _why(exc: BaseException | None) -> str:
    """What was wrong, in words (aiohttp's own messages quote the client's bytes back)."""
    for kind, why in _WHY:
        if isinstance(exc, kind):
            return why
    return "it cannot be parsed as HTTP/1.1"


_WHY: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.LineTooLong, "the request line or a header is longer than the server accepts"),
    (http_exceptions.BadHttpMethod, "invalid method"),
    (http_exceptions.BadStatusLine, "invalid request line"),
    (http_exceptions.InvalidURLError, "invalid request target"),
    (http_exceptions.InvalidHeader, "invalid header"),
    (http_exceptions.TransferEncodingError, "invalid Transfer-Encoding"),
    (http_exceptions.ContentLengthError, "invalid Content-Length"),
    (http_exceptions.BadHttpMessage, "invalid headers or too many of them"),
)


# podman 5 asks for the chunks of a zstd:chunked layer in one Range header of 10 KiB and more
# (seen: 700 ranges, 10.8 KiB); aiohttp's default limit of a header field is 8 KiB. Go's
# servers (distribution) accept 1 MiB of headers.
FIELD_MAX = 64 << 10


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return OciRequestHandler(self, loop=self._loop, **{"max_field_size": FIELD_MAX, **self._kwargs})


class MirrorRunner(web.AppRunner):
    """`web.AppRunner` whose server makes `OciRequestHandler` connections."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the application, as AppRunner does
        return _Server(made.request_handler, request_factory=made.request_factory, **self._kwargs)


async def serve(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None,
    on_listening: Callable[[], None], **runner_args: Any,
) -> None:
    """Serve `app` on host:port until SIGTERM or SIGINT, then finish running responses and stop."""
    runner = MirrorRunner(app, **runner_args)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        await until_signalled(on_listening)
    finally:
        await runner.cleanup()


async def until_signalled(on_waiting: Callable[[], None]) -> None:
    """Return at the first SIGTERM or SIGINT (`on_waiting` is called once they are caught); later
    ones are ignored while the caller shuts down.

    A second signal is usual (a service manager signals every process of the group, then a
    supervisor its workers) and changes nothing. Ignoring it also keeps it from asyncio's handler
    after the loop closed its wakeup pipe: `loop.close` closes the pipe before it removes its
    signal handlers, and a signal in between is reported as "Bad file descriptor".
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_waiting()
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors, router errors and crashes into OCI JSON bodies."""
    try:
        return await handler(request)
    except RegistryError as err:
        request[RESULT] = request.get(RESULT, "error")
        return error_response(err)
    except NeedsPrimary:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "UNKNOWN")
        message = exc.reason if exc.status != 404 else "not found"
        if exc.status == 405:
            message = "method not allowed"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "content-range")}
        request[RESULT] = "error"
        return error_response(RegistryError(code, exc.status, message, headers=headers))
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        request[RESULT] = "error"
        return error_response(RegistryError("UNKNOWN", 500, "internal error; see the mirror's log"))
