"""One access-log line per request, and the per-request metrics that need the final size."""
from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from mirror.metrics import Metrics
from mirror.requestinfo import KIND, RESULT


def access_logger_for(metrics: Metrics) -> type[AbstractAccessLogger]:
    class AccessLogger(AbstractAccessLogger):
        """`remote method path status bytes duration result`; counts requests and bytes served."""

        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            kind = request.get(KIND, "other")
            result = request.get(RESULT) or ("error" if response.status >= 400 else "hit")
            size = response.content_length or 0 if request.method == "GET" and response.status < 300 else 0
            if kind != "other" or request.path.startswith("/v2"):
                metrics.requests.labels(kind, request.method, result).inc()
                metrics.request_duration.labels(kind).observe(time)
                if kind in ("manifest", "blob") and response.status < 300 and size:
                    metrics.bytes_served.labels("upstream" if result == "miss" else "cache").inc(size)
            self.logger.info(
                "%s %s %s %d %d %.3fs %s",
                request.remote, request.method, request.path_qs[:300], response.status, size, time, result,
            )

    return AccessLogger


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
