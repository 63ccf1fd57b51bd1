"""Per-request observation: request metrics (counted once the body is sent) and the access log."""
from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from mirror.errors import Handler
from mirror.metrics import Metrics
from mirror.requestinfo import KIND, RESULT

METRICS = web.AppKey("metrics", Metrics)


def _result(request: BaseRequest, response: StreamResponse | None) -> str:
    if response is None:
        return "error"
    return request.get(RESULT) or ("error" if response.status >= 400 else "hit")


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
            await response.prepare(request)
            await response.write_eof()
        return response
    finally:
        kind = request.get(KIND, "other")
        result = _result(request, response)
        metrics.requests.labels(kind, request.method, result).inc()
        metrics.request_duration.labels(kind).observe(time.perf_counter() - started)
        if response is not None and request.method == "GET" and response.status < 300 and kind in ("manifest", "blob"):
            metrics.bytes_served.labels("upstream" if result == "miss" else "cache").inc(response.content_length or 0)


class AccessLogger(AbstractAccessLogger):
    """`remote method path status bytes duration result`, one line per request."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %d %.3fs %s",
            request.remote, request.method, request.path_qs[:300], response.status,
            response.body_length, time, _result(request, response),
        )


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
