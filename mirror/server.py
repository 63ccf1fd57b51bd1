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
from mirror.hotpath import HOT, WRITE_BUFFER_LIMIT, Answered, HotAnswers, whole_requests
from mirror.observe import AccessLogger
from mirror.requestinfo import RESULT

log = logging.getLogger("mirror")


class OciRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with OCI error bodies, and fresh
    manifest hits from `hot` before aiohttp parses them (see mirror.hotpath)."""

    def __init__(self, manager: web.Server, *, hot: HotAnswers | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._hot = hot
        self._remote: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and isinstance(self.access_logger, (AccessLogger, type(None))):
            self._remote = peer[0]
        else:
            self._hot = None  # a worker's socket: what comes there is counted and logged where it came from

    def data_received(self, data: bytes) -> None:
        hot = self._hot
        if hot is None or not self._idle():
            self._hand_over(data)
            return
        assert self.transport is not None
        out, answered, used = hot.answer(data, WRITE_BUFFER_LIMIT - self.transport.get_write_buffer_size())
        if answered:
            self.transport.write(out)
            self._answered(answered)
        if used < len(data):
            self._hand_over(data[used:] if used else data)

    def _idle(self) -> bool:
        """Waiting for a request, with nothing of one read: an answer written now comes in order."""
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and not self._messages and not self._close
                and self.transport is not None)

    def _hand_over(self, data: bytes) -> None:
        """Give `data` to aiohttp. Unless it is whole requests without bodies, its parser may now
        hold part of one, and only it can tell where the next begins: it takes the connection."""
        if self._hot is not None and not whole_requests(data):
            self._hot = None
        super().data_received(data)

    def _answered(self, answered: list[Answered]) -> None:
        """What aiohttp does after each answer: keep the connection alive for as long, log it."""
        loop = self._loop
        self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None:
            self._keepalive_handle = loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
        if isinstance(self.access_logger, AccessLogger) and self._logging_enabled:
            for one in answered:
                self.access_logger.log_line(self._remote, one.method, one.target, 200, one.body_bytes,
                                            one.seconds, "hit")

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
    def __init__(self, *args: Any, hot: HotAnswers | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hot = hot

    def __call__(self) -> RequestHandler:
        return OciRequestHandler(self, loop=self._loop, hot=self._hot, **{"max_field_size": FIELD_MAX, **self._kwargs})


class MirrorRunner(web.AppRunner):
    """`web.AppRunner` whose server makes `OciRequestHandler` connections (with the application's
    `HOT` answers, if it has them)."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the application, as AppRunner does
        return _Server(made.request_handler, request_factory=made.request_factory, hot=self.app.get(HOT),
                       **self._kwargs)


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
