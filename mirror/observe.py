"""Per-request observation: request metrics (counted once the body is sent) and the access log.

Logs are plain text or, with `server.log_format = "json"`, one JSON object per
line; access-log lines then carry their fields (remote, method, path, status,
bytes, duration, result) as keys of their own.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from mirror.errors import Handler
from mirror.metrics import Metrics
from mirror.requestinfo import KIND, RESULT

METRICS = web.AppKey("metrics", Metrics)
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
    metrics = request.app[METRICS]
    started = time.perf_counter()
    response: StreamResponse | None = None
    try:
        response = await handler(request)
        if not response.prepared:
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                pass  # the client went away mid-answer: nothing to log but the access line
        return response
    finally:
        kind = request.get(KIND, "other")
        result = _result(request, response)
        metrics.requests.labels(kind, request.method, result).inc()
        metrics.request_duration.labels(kind).observe(time.perf_counter() - started)
        if (response is not None and request.method == "GET" and response.status < 300
                and kind in ("manifest", "blob") and result in SERVED):
            metrics.bytes_served.labels("upstream" if result == "miss" else "cache").inc(response.content_length or 0)


class AccessLogger(AbstractAccessLogger):
    """`remote method path status bytes duration result`, one line per request."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path_qs[:300],
            "status": response.status,
            "bytes": response.body_length,
            "duration": round(time, 6),
            "result": _result(request, response) if request.path.startswith("/v2") else "-",
        }
        self.logger.info(
            "%s %s %s %d %d %.3fs %s",
            fields["remote"], fields["method"], fields["path"], fields["status"],
            fields["bytes"], time, fields["result"], extra={"access": fields},
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (+ access fields, exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, log_format: str = "plain") -> None:
    """Configure the root logger: `plain` text lines or `json` objects, one per line, on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
