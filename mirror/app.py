"""Builds and wires every part of the mirror; the only place that constructs things."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from mirror import adminapi, routes
from mirror.cache.admin import CacheAdmin
from mirror.cache.eviction import Evictor, cap_bytes
from mirror.config import Config
from mirror.errors import error_middleware
from mirror.metrics import Metrics, read_cache_usage
from mirror.observe import METRICS, metrics_middleware
from mirror.proxy.access import AccessPolicy
from mirror.proxy.blobs import BlobService
from mirror.proxy.inflight import Inflight
from mirror.proxy.manifests import ManifestService
from mirror.proxy.tags import TagListService
from mirror.proxy.tokens import TokenService
from mirror.routing import Router
from mirror.storage.blobs import ContentStore
from mirror.storage.lock import DataDirLock
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
    inflight = Inflight(store, metrics, on_disk_full=lambda: evictor.wake())
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

    lock = DataDirLock(data_dir)
    cap = lambda: cap_bytes(config.cache.max_size, data_dir)  # noqa: E731 (a share of the disk is read anew)
    evictor = Evictor(store, metadata, metrics, cap, services.manifests.forget)
    metrics.watch_cache(lambda: read_cache_usage(metadata.path), cap)
    admin = CacheAdmin(store, metadata, services.router, evictor, cap, clock, services.hits, inflight.temp_files,
                       lambda: hit_ratio(metrics))
    app = web.Application(middlewares=[metrics_middleware, error_middleware, routes.challenge_middleware])
    app[METRICS] = metrics
    app[routes.SERVICES] = services
    routes.setup(app)
    adminapi.setup(app, admin, config.server.admin_token)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        store.prepare()
        await metadata.open()
        dropped, adopted = await reconcile(store, metadata)
        loop = asyncio.get_running_loop()
        background = [loop.create_task(_flush_access(metadata)), loop.create_task(evictor.run())]
        services.ready = True
        log.info("mirror ready: data in %s (%.1f MiB cached, cap %.1f MiB), upstreams %s", data_dir.resolve(),
                 metadata.size / 2**20, evictor.cap() / 2**20, ", ".join(upstreams))
        yield
        services.ready = False
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await inflight.close()
        for upstream in upstreams.values():
            await upstream.close()
        await metadata.close()
        lock.release()

    async def stop_being_ready(app: web.Application) -> None:
        services.ready = False

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(stop_being_ready)
    return app


def hit_ratio(metrics: Metrics) -> float | None:
    """Share of manifest and blob requests answered from the cache since start."""
    counts: dict[str, float] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["kind"] in ("manifest", "blob"):
                counts[sample.labels["result"]] = counts.get(sample.labels["result"], 0) + sample.value
    total = sum(counts.values())
    cached = counts.get("hit", 0) + counts.get("coalesced", 0) + counts.get("stale", 0)
    return cached / total if total else None


async def _flush_access(metadata: Metadata) -> None:
    """Write batched access times every few seconds instead of once per request."""
    while True:
        await asyncio.sleep(ACCESS_FLUSH_SECONDS)
        try:
            await metadata.flush_access()
        except Exception:
            log.exception("could not write access times")
