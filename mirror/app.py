"""Builds and wires every part of the mirror; the only place that constructs things.

`build` constructs the parts (for the server, and for `mirror cache …` on a stopped
mirror's data directory); `make_app` wires them into the aiohttp application and
opens, starts and stops them with it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from mirror import adminapi, adminsocket, routes
from mirror.cache.admin import CacheAdmin
from mirror.cache.bucketeviction import BucketEvictor
from mirror.cache.eviction import Evictor, cap_bytes, pinned_digests
from mirror.config import Config, parse_size
from mirror.hotpath import HOT, HotAnswers
from mirror.metrics import Metrics
from mirror.observe import METRICS, metrics_middleware
from mirror.proxy.access import AccessPolicy
from mirror.proxy.blobs import BlobService
from mirror.proxy.catalog import CatalogService
from mirror.proxy.inflight import Inflight
from mirror.proxy.manifests import ManifestService
from mirror.proxy.referrers import ReferrersService
from mirror.proxy.shared import SharedContent
from mirror.proxy.tags import TagListService
from mirror.proxy.token_realm import TokenService
from mirror.routing import Router
from mirror.server import error_middleware
from mirror.storage.bucket import Bucket
from mirror.storage.filestore import FileStore
from mirror.storage.lock import DataDirLock
from mirror.storage.metadata import Metadata
from mirror.storage.reconcile import reconcile
from mirror.storage.store import ContentStore
from mirror.storage.secret import data_dir_secret, derive
from mirror.upstream.authorizer import TokenCache
from mirror.upstream.credentials import Fingerprinter
from mirror.upstream.client import Upstream
from mirror.upstream.ratelimit import RateLimits
from mirror.workers.forward import PrimaryLink, forward_middleware
from mirror.workers.role import WorkerRole

log = logging.getLogger("mirror")

FLUSH_SECONDS = 5.0
RECONCILED = web.AppKey("reconciled", asyncio.Event)  # set once the start-up reconciliation is done


@dataclass
class Parts:
    """Everything a mirror is made of, constructed by `build` and nowhere else."""

    data_dir: Path
    metrics: Metrics
    store: ContentStore
    metadata: Metadata
    upstreams: dict[str, Upstream]
    inflight: Inflight
    access: AccessPolicy
    services: routes.Services
    evictor: Evictor
    admin: CacheAdmin
    link: PrimaryLink | None  # a secondary worker's way to the primary
    shared: SharedContent | None  # the fleet's bucket (storage.backend "s3"); in a secondary, only to redirect
    bucket_evictor: BucketEvictor | None

    async def open(self) -> None:
        """Open the database (SchemaTooNew if a newer mirror wrote it), and the bucket, checked
        for reads and writes (BucketError if it cannot be used)."""
        await self.metadata.open()
        if self.shared is not None:
            try:
                await self.shared.bucket.open()
                await self.shared.bucket.check()
            except BaseException:
                await self.shared.bucket.close()
                await self.metadata.close()
                raise

    async def close(self) -> None:
        """Stop background revalidations and fetches, then close connections and the database."""
        for revalidations in (self.services.manifests.background, self.access.background,
                              self.services.tags.background, self.services.referrers.background):
            await revalidations.close()
        await self.inflight.close()
        if self.shared is not None:
            await self.shared.close()
            await self.shared.bucket.close()
        for upstream in self.upstreams.values():
            await upstream.close()
        if self.link is not None:
            await self.link.close()
        await self.metadata.close()


def build(config: Config, clock: Callable[[], float] = time.time, role: WorkerRole | None = None) -> Parts:
    """The parts of the mirror `config` describes: of the whole mirror (`role` None), or of one worker.

    Nothing is opened or started (see `Parts.open` and `make_app`), but the data directory
    is made, with its secret (SecretError if that cannot be used). A secondary worker's
    parts serve what the cache holds and hand the rest to the primary.
    """
    data_dir = Path(config.server.data_dir)
    secondary = role is not None and not role.primary
    metrics = Metrics(role.metrics_dir if role else None)
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = data_dir_secret(data_dir)  # the same in every worker and after every restart
    fingerprints = Fingerprinter(derive(secret, "fingerprint"))
    store = FileStore(data_dir)
    s3 = config.storage.s3
    shared = None
    # A secondary hands what it lacks to the primary; it needs the bucket only to redirect its hits.
    if config.storage.backend == "s3" and (not secondary or s3.redirect):
        shared = SharedContent(Bucket(s3, metrics), store, metrics, s3.redirect, s3.redirect_ttl, clock)
    # stored bytes and bytes being fetched wake eviction as they cross the cap (storage knows no cache)
    metadata = Metadata(data_dir / "index.db", on_grown=lambda: evictor.stored())
    upstream_tokens = TokenCache(clock)
    limits = RateLimits(metrics, clock)
    upstreams = {name: Upstream(cfg, upstream_tokens, limits, metrics, fingerprints, local_only=secondary)
                 for name, cfg in config.upstreams.items()}
    inflight = Inflight(store, metrics, on_disk_full=lambda: evictor.wake(), local_only=secondary,
                        on_written=lambda: evictor.written(), room=lambda size: evictor.room(size),
                        publish=shared.publish if shared and not secondary else None)
    access = AccessPolicy(metadata, clock)
    router = Router(upstreams, config.server.default_upstream)
    services = routes.Services(
        router=router,
        manifests=ManifestService(store, metadata, access, metrics, clock, None if secondary else shared),
        blobs=BlobService(store, metadata, inflight, access, clock, shared),
        tags=TagListService(clock),
        referrers=ReferrersService(access, clock),
        catalog=CatalogService(metadata, router),
        tokens=TokenService(derive(secret, "tokens"), fingerprints, clock),
        metrics=metrics,
        public_url=config.server.public_url,
    )
    cap = lambda: cap_bytes(config.cache.max_size, data_dir)  # noqa: E731 (a share of the disk is read anew)
    evictor = Evictor(store, metadata, metrics, cap, services.manifests.forget, inflight.bytes_in_flight)
    metrics.watch_cache(metadata.stats.read_usage, cap)
    bucket_cap = parse_size(config.storage.s3.max_size)[0] if config.storage.s3.max_size else None
    admin = CacheAdmin(store, metadata, router, evictor, cap, clock, inflight.temp_files,
                       lambda: hit_ratio(metrics), shared, bucket_cap)
    bucket_evictor = (BucketEvictor(shared, bucket_cap, lambda: pinned_digests(metadata, store), metrics, clock)
                      if shared is not None and not secondary else None)
    link = PrimaryLink(role.primary_socket, role.index, store) if secondary and role else None
    return Parts(data_dir, metrics, store, metadata, upstreams, inflight, access, services, evictor, admin, link,
                 shared, bucket_evictor)


def make_app(config: Config, clock: Callable[[], float] = time.time, role: WorkerRole | None = None) -> web.Application:
    """The whole mirror in one process (`role` None), or one worker of several.

    A secondary worker (role index > 0) serves what the cache holds and hands the
    rest to the primary; the primary is a whole mirror, minus the data directory
    lock its supervisor holds for the group. The mirror, or the primary, serves
    `/admin/` on its admin socket while it runs (see mirror.adminapi); starting
    raises AdminSocketError if that socket's path is taken by something else.
    """
    parts = build(config, clock, role)
    data_dir, services = parts.data_dir, parts.services
    secondary = parts.link is not None
    lock = DataDirLock(data_dir)
    admin_socket = adminsocket.AdminSocket(adminsocket.path_in(data_dir))
    middlewares = [metrics_middleware, error_middleware, routes.challenge_middleware]
    if parts.link is not None:
        middlewares.insert(1, forward_middleware(parts.link))
    app = web.Application(middlewares=middlewares)
    app[METRICS] = parts.metrics
    app[RECONCILED] = asyncio.Event()
    if secondary:
        app[RECONCILED].set()  # the primary reconciles
    app[routes.SERVICES] = services
    app[HOT] = HotAnswers(parts.metrics, clock, services.tokens.still_accepted)
    routes.setup(app)
    if secondary:
        adminapi.setup_forwarding(app)  # maintenance is the primary's: it runs eviction and fetches
    else:
        adminapi.setup(app, parts.admin, config.server.admin_token, admin_socket.path)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as running:  # undone in reverse, also when starting fails
            if role is None:  # a group's supervisor holds it for all its workers
                lock.acquire()
                running.callback(lock.release)
            listening = None
            if not secondary:  # the one writer: empties tmp/ and reconciles what a crash left
                listening = admin_socket.open()  # first: a path taken by anything else stops the start
                running.callback(admin_socket.close)
                parts.store.prepare()
            await parts.open()
            running.push_async_callback(parts.close)
            background = [asyncio.get_running_loop().create_task(_flush(parts.metadata))]
            running.push_async_callback(_cancel, background)
            if not secondary:
                # Reconciling reads every stored object's name, so it runs beside serving, not before
                # it: start-up then does not grow with the cache (1M objects: 7.7 s before ready). Until
                # it is done a row without its file reads as a miss, and a file without its row is
                # confirmed upstream before it is served, as after any crash.
                background.append(asyncio.get_running_loop().create_task(_reconcile(parts, app[RECONCILED])))
                background.append(asyncio.get_running_loop().create_task(parts.evictor.run()))
                if parts.bucket_evictor is not None:
                    background.append(asyncio.get_running_loop().create_task(parts.bucket_evictor.run()))
            if listening is not None:  # answered from now on; a command that came sooner waited in its queue
                admin_runner = await adminapi.serve_socket(parts.admin, listening, config.server.shutdown_timeout)
                running.push_async_callback(admin_runner.cleanup)
            services.ready = True
            log.info("mirror %sready: data in %s (%.1f MiB cached, cap %.1f MiB), upstreams %s",
                     f"worker {role.index} " if role else "", data_dir.resolve(),
                     parts.metadata.content.size / 2**20, parts.evictor.cap() / 2**20, ", ".join(parts.upstreams))
            yield
            services.ready = False

    async def stop_being_ready(app: web.Application) -> None:
        services.ready = False

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(stop_being_ready)
    return app


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def hit_ratio(metrics: Metrics) -> float | None:
    """Share of manifest and blob requests answered from the cache since start."""
    counts: dict[str, float] = {}
    for family in metrics.request_counts():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["kind"] in ("manifest", "blob"):
                counts[sample.labels["result"]] = counts.get(sample.labels["result"], 0) + sample.value
    total = sum(counts.values())
    cached = counts.get("hit", 0) + counts.get("coalesced", 0) + counts.get("stale", 0)
    return cached / total if total else None


async def _reconcile(parts: Parts, done: asyncio.Event) -> None:
    try:
        await reconcile(parts.store, parts.metadata)
    except Exception:
        log.exception("could not reconcile the content store with its metadata; `mirror cache gc` tries again")
    finally:
        done.set()


async def _flush(metadata: Metadata) -> None:
    """Write what requests kept in memory (access times, hit counts, access decisions) every few seconds."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        try:
            await metadata.flush()
        except Exception:
            log.exception("could not write access times, hit counts and access decisions")
