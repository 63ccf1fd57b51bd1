"""Per-request observation: request metrics (counted once the body is sent) and the access log.

Logs are plain text or, with `server.log_format = "json"`, one JSON object per
line; access-log lines then carry their fields (remote, method, path, status,
bytes, duration, result) as keys of their own.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from aiohttp.typedefs import Handler
from mirror.metrics import Metrics
from mirror.requestinfo import BODY_LENGTH, FORWARDED, KIND, RESULT, SENT_BY_SENDFILE, client_address, handed_by

METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOGGER = "mirror.access"
SERVED = ("hit", "miss", "coalesced", "stale")  # results whose body reached the client


def _result(request: BaseRequest, response: StreamResponse | None) -> str:
    """hit, miss, coalesced or stale for content served; denied (401/403) or error otherwise.

    A request that started as a miss and then failed (upstream 429, 5xx, gone)
    is an error: its client got no content.
    """
    if response is None:
        return "error"
    result = request.get(RESULT)
    if response.status in (401, 403):
        return "denied"
    if response.status >= 400:
        return "error"
    return result or "hit"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every `/v2` request by kind and result, its duration and the bytes it served.

    The response is sent here (not after the middleware returns) so that file
    responses are counted with their body, whoever logs them.
    """
    if not request.path.startswith("/v2"):
        return await handler(request)
    started = time.perf_counter()
    response: StreamResponse | None = None
    try:
        response = await handler(request)
        if not response.prepared:
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError as exc:
                client_left(request, exc)
        return response
    finally:
        if not request.get(FORWARDED):  # else the primary worker, which answered it, counts it
            _count(request, response, time.perf_counter() - started)



_COUNTED = web.RequestKey("client_left_counted", bool)


def client_left(request: web.Request, reason: BaseException | None = None) -> None:
    """Note that the request's client went away mid-answer: a debug line and one count per request."""
    if request.get(_COUNTED):
        return
    request[_COUNTED] = True
    kind = request.get(KIND, "other")
    request.app[METRICS].client_disconnects.labels(kind).inc()
    logging.getLogger("mirror.clients").debug(
        "client %s left before the answer to %s %s was whole: %s",
        request.remote, request.method, request.path, reason or "connection closed")


def _count(request: web.Request, response: StreamResponse | None, seconds: float) -> None:
    kind = request.get(KIND, "other")
    result = _result(request, response)
    served = (response is not None and request.method == "GET" and response.status < 300
              and kind in ("manifest", "blob") and result in SERVED)
    request.app[METRICS].count_request(kind, request.method, result, seconds,
                                       _content_bytes(response) if served and response is not None else None)


def _content_bytes(response: StreamResponse) -> int:
    """The body's length; for an answer a secondary worker follows, the length it stands for."""
    return int(response.headers.get(BODY_LENGTH) or response.content_length or 0)


class AccessLogger(AbstractAccessLogger):
    """`remote method path status bytes duration result`, one line per request.

    In a group of workers, `worker N` follows, and `from M` when secondary M handed it over.
    """

    worker: int | None = None  # set on the subclass a worker process of a group uses

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO) or request.get(FORWARDED):
            return  # the primary worker, which answered it, logs a forwarded request
        body_bytes = _content_bytes(response) if BODY_LENGTH in response.headers \
            else response.body_length + request.get(SENT_BY_SENDFILE, 0)
        result = _result(request, response) if request.path.startswith("/v2") else "-"
        self.log_line(client_address(request), request.method, request.path_qs, response.status, body_bytes,
                      time, result, handed_by(request))

    def log_line(self, remote: str | None, method: str, path: str, status: int, body_bytes: int, seconds: float,
                 result: str, from_worker: int | None = None) -> None:
        """One line; `from_worker`: the secondary worker that handed the request over."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        path = path[:300]
        worker = self.worker
        message = f"{remote} {method} {path} {status} {body_bytes} {seconds:.3f}s {result}"
        if worker is not None:
            message += f" worker {worker}" if from_worker is None else f" worker {worker} from {from_worker}"

        def fields() -> dict[str, object]:  # built only for a JSON log
            made: dict[str, object] = {"remote": remote, "method": method, "path": path, "status": status,
                                       "bytes": body_bytes, "duration": round(seconds, 6), "result": result}
            if worker is not None:
                made["worker"] = worker
                if from_worker is not None:
                    made["from_worker"] = from_worker
            return made

        if _access_sink is not None:
            _access_sink.write_access(message, fields)
        else:
            self.logger.info("%s", message, extra={"access": fields()})

    @classmethod
    def for_worker(cls, index: int) -> type[AccessLogger]:
        return type(f"{cls.__name__}Worker{index}", (cls,), {"worker": index})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (+ access fields, exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(record.created, record.levelname, record.name, record.getMessage())
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)

    def access_line(self, created: float, message: str, fields: Callable[[], dict[str, object]]) -> str:
        """What `format` makes of an access-log record, without the record."""
        return json.dumps({**self._entry(created, "INFO", ACCESS_LOGGER, message), **fields()},
                          default=str, ensure_ascii=False)

    @staticmethod
    def _entry(created: float, level: str, name: str, message: str) -> dict[str, object]:
        return {"time": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": level.lower(), "logger": name, "message": message}


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    """PLAIN_FORMAT lines; the date and time are formatted once per second, not once per line."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created)

    def access_line(self, created: float, message: str, fields: Callable[[], dict[str, object]]) -> str:
        """What `format` makes of an access-log record, without the record (`fields` unused)."""
        return f"{self._time(created)} INFO {ACCESS_LOGGER}: {message}"

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.default_time_format, self.converter(second))
        return self.default_msec_format % (self._text, int((created - second) * 1000))


class BatchingHandler(logging.Handler):
    """Writes lines to a stream in batches: at most `delay` seconds late, warnings and worse at once.

    One write per access-log line cost a quarter of the time of a cached
    manifest request; batching them is what nginx's `access_log ... buffer=` does.
    """

    def __init__(self, stream: TextIO, delay: float = 0.2, max_lines: int = 256) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._stopped = threading.Event()
        self._delay = delay
        threading.Thread(target=self._flush_regularly, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= self.max_lines:
            self.flush()

    def write_access(self, message: str, fields: Callable[[], dict[str, object]]) -> None:
        """An access-log line, formatted as the record would be, without the logging machinery
        (a LogRecord and its handling cost a quarter of a cached manifest request)."""
        formatter = self.formatter
        assert isinstance(formatter, (PlainFormatter, JsonFormatter))
        line = formatter.access_line(time.time(), message, fields) + "\n"
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._lines.append(line)
            full = len(self._lines) >= self.max_lines
        if full:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            lines, self._lines = self._lines, []
            if lines:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone (closed pipe): nowhere left to report it

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        super().close()

    def _flush_regularly(self) -> None:
        while not self._stopped.wait(self._delay):
            self.flush()


def setup_logging(level: str, log_format: str = "plain") -> None:
    """Configure the root logger: `plain` text lines or `json` objects, one per line, on stderr."""
    # Our formats use none of the caller, thread or process fields: not collecting them
    # is the logging HOWTO's "Optimization" advice, and halves the cost of an access line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    global _access_sink
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    _access_sink = handler


_access_sink: BatchingHandler | None = None  # where access lines go directly, once logging is set up
