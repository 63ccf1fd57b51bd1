"""Builds and wires every part of the mirror; the only place that constructs things."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from mirror import routes
from mirror.config import Config
from mirror.errors import error_middleware
from mirror.metrics import Metrics
from mirror.observe import METRICS, metrics_middleware
from mirror.proxy.access import AccessPolicy
from mirror.proxy.blobs import BlobService
from mirror.proxy.inflight import Inflight
from mirror.proxy.manifests import ManifestService
from mirror.proxy.tags import TagListService
from mirror.proxy.tokens import TokenService
from mirror.routing import Router
from mirror.storage.blobs import ContentStore
from mirror.storage.metadata import Metadata
from mirror.storage.reconcile import reconcile
from mirror.upstream.auth import TokenCache
from mirror.upstream.client import Upstream
from mirror.upstream.ratelimit import RateLimits

log = logging.getLogger("mirror")

ACCESS_FLUSH_SECONDS = 5.0


def make_app(config: Config, clock: Callable[[], float] = time.time) -> web.Application:
    data_dir = Path(config.server.data_dir)
    metrics = Metrics()
    store = ContentStore(data_dir)
    metadata = Metadata(data_dir / "index.db")
    upstream_tokens = TokenCache(clock)
    limits = RateLimits(metrics, clock)
    upstreams = {name: Upstream(cfg, upstream_tokens, limits, metrics) for name, cfg in config.upstreams.items()}
    inflight = Inflight(store, metrics)
    access = AccessPolicy(metadata, clock)
    services = routes.Services(
        router=Router(upstreams, config.server.default_upstream),
        manifests=ManifestService(store, metadata, access, metrics, clock),
        blobs=BlobService(store, metadata, inflight, access, clock),
        tags=TagListService(clock),
        tokens=TokenService(clock),
        metrics=metrics,
        public_url=config.server.public_url,
    )

    app = web.Application(middlewares=[metrics_middleware, error_middleware, routes.challenge_middleware])
    app[METRICS] = metrics
    app[routes.SERVICES] = services
    routes.setup(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        data_dir.mkdir(parents=True, exist_ok=True)
        store.prepare()
        await metadata.open()
        dropped, adopted = await reconcile(store, metadata)
        flusher = asyncio.get_running_loop().create_task(_flush_access(metadata))
        services.ready = True
        log.info("mirror ready: data in %s, upstreams %s", data_dir.resolve(), ", ".join(upstreams))
        yield
        services.ready = False
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await inflight.close()
        for upstream in upstreams.values():
            await upstream.close()
        await metadata.close()

    async def stop_being_ready(app: web.Application) -> None:
        services.ready = False

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(stop_being_ready)
    return app


async def _flush_access(metadata: Metadata) -> None:
    """Write batched access times every few seconds instead of once per request."""
    while True:
        await asyncio.sleep(ACCESS_FLUSH_SECONDS)
        try:
            await metadata.flush_access()
        except Exception:
            log.exception("could not write access times")
