"""Manifests: immutable by digest, cached by tag with a TTL, revalidated with HEAD.

A fresh tag costs no upstream request; a stale one costs one HEAD (which Docker
Hub does not count against pull limits) and a GET only when the digest moved to
content we do not hold. When upstream is down, failing or rate-limiting, the
stale copy is served instead of an error; when it does not answer within the
upstream's `revalidate_timeout` too, while the revalidation goes on in the
background and moves the tag if it can. What the cache lacks waits for upstream
as long as upstream's own timeouts allow.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.metrics import Metrics
from mirror.proxy.access import AccessPolicy, Principal
from mirror.proxy.shared import SharedContent
from mirror.proxy.revalidation import Background, Overdue, revalidation_deadline
from mirror.proxy.singleflight import SingleFlight
from mirror.manifest import InvalidManifest, digest_of, media_type_of, referenced_digests
from mirror.reference import ManifestRef
from mirror.storage.store import ContentStore
from mirror.storage.images import image_parts
from mirror.storage.metadata import Metadata, TagRow
from mirror.upstream.credentials import Credentials, fingerprint
from mirror.mediatypes import MANIFEST_TYPES
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError

log = logging.getLogger("mirror.manifests")

ACCEPT_ALL = ", ".join(MANIFEST_TYPES)
MEMORY_BYTES = 64 << 20
PARTS_RECHECK = 60.0


@dataclass(frozen=True)
class CachedManifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What to send, and how we got it (hit, miss, stale).

    A hit has `again(now)`: if the same request by the same principal would get the same hit at
    `now` without asking upstream or the database, it records what that hit does (its image's
    access times) and returns True; otherwise False (see mirror.hotpath).
    """

    digest: str
    media_type: str
    body: bytes
    result: str
    again: Callable[[float], bool] | None = None


def _answer(m: CachedManifest, result: str, again: Callable[[float], bool] | None = None) -> Answer:
    return Answer(m.digest, m.media_type, m.body, result, again)


def accepts(accept_headers: Iterable[str], media_type: str) -> bool:
    """Whether a client's Accept headers admit `media_type` (no header admits anything)."""
    types = _accepted(tuple(accept_headers))
    return not types or "*/*" in types or media_type in types


@functools.lru_cache(maxsize=256)
def _accepted(accept_headers: tuple[str, ...]) -> frozenset[str]:
    """The media types named by Accept headers; clients send the same few headers over and over."""
    return frozenset(t.split(";")[0].strip() for h in accept_headers for t in h.split(",") if t.strip())


class ManifestService:
    def __init__(
        self, store: ContentStore, metadata: Metadata, access: AccessPolicy, metrics: Metrics,
        clock: Callable[[], float] = time.time, shared: SharedContent | None = None,
    ) -> None:
        """`shared`: the fleet's bucket, asked for manifests this replica lacks, and published to."""
        self.store = store
        self.shared = shared
        self.metadata = metadata
        self.access = access
        self.metrics = metrics
        self.clock = clock
        self._memory: LRUCache[str, CachedManifest] = LRUCache(MEMORY_BYTES, getsizeof=lambda m: len(m.body))
        self._flights = SingleFlight()
        # digest → (its image's parts, when to look again: None once every part is cached)
        self._parts: LRUCache[str, tuple[tuple[str, ...], float | None]] = LRUCache(100_000)
        # (upstream, repo, tag, who asked upstream) → until when upstream's 404 for it is believed
        self._absent: LRUCache[tuple[str, str, str, str], tuple[float, str]] = LRUCache(10_000)
        self.background = Background()  # revalidations of expired tags past their deadline

    async def get(
        self, upstream: Upstream, repo: str, ref: ManifestRef, accept: list[str], principal: Principal
    ) -> Answer:
        try:
            if ref.digest:
                answer = await self._by_digest(upstream, repo, ref.digest, principal)
            else:
                assert ref.tag is not None
                answer = await self._by_tag(upstream, repo, ref.tag, principal)
            if not accepts(accept, answer.media_type):
                return await self._passthrough(upstream, repo, str(ref), accept, principal)
        except UpstreamError as exc:
            raise exc.to_registry_error("MANIFEST_UNKNOWN") from None
        await self._touch_image(answer.digest)
        return answer

    async def _touch_image(self, digest: str) -> None:
        """Bump every part of the image, so its parts age together and are evicted whole."""
        now = self.clock()
        known = self._parts.get(digest)
        if known is None or (known[1] is not None and now > known[1]):
            found, complete = await self._flights.do(("parts", digest),
                                                     lambda: image_parts(self.metadata, self.store, digest))
            known = self._parts[digest] = (tuple(found), None if complete else now + PARTS_RECHECK)
        self.metadata.content.touch(known[0], now)

    def _again(self, digest: str, still: Callable[[float], bool]) -> Callable[[float], bool]:
        """A hit's `again`: the manifest still in memory, its image's parts known and current, and
        `still(now)` (what else the hit depended on)."""
        def again(now: float) -> bool:
            known = self._parts.get(digest)
            if (known is None or (known[1] is not None and now > known[1]) or digest not in self._memory
                    or not still(now)):
                return False
            self.metadata.content.touch(known[0], now)
            return True
        return again

    def forget(self, digests: list[str]) -> None:
        """Evicted content leaves the in-memory caches too."""
        for digest in digests:
            self._memory.pop(digest, None)
        self._parts.clear()

    async def _allow(
        self, upstream: Upstream, repo: str, principal: Principal, ref: str, deadline: float | None = None
    ) -> None:
        """The access check, probing with a HEAD of `ref`; `deadline` as for `AccessPolicy.ensure`."""
        await self.access.ensure(
            upstream, repo, principal, lambda creds: upstream.head_manifest(repo, ref, ACCEPT_ALL, creds), deadline
        )

    # -- by digest ---------------------------------------------------------------
    async def _by_digest(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> Answer:
        cached = await self._load(digest)
        if cached is not None:
            await self._allow(upstream, repo, principal, digest)
            if not await self.metadata.links.contains(upstream.name, repo, digest):
                await upstream.head_manifest(repo, digest, ACCEPT_ALL, principal.upstream)
                await self.metadata.links.add(upstream.name, repo, [digest])
            allows = self.access.still_allows(upstream, repo, principal)
            return _answer(cached, "hit", self._again(digest, lambda now: allows(now)
                                                      and self.metadata.links.known(upstream.name, repo, digest)))
        if not principal.fetches_as_itself:
            await self._allow(upstream, repo, principal, digest)
        fetched = await self.access.observe(upstream, repo, principal, self._flights.do(
            ("digest", upstream.name, repo, digest, fingerprint(principal.upstream)),
            lambda: self._fetch(upstream, repo, digest, digest, principal.upstream),
        ))
        return _answer(fetched, "miss")

    async def _fetch(
        self, upstream: Upstream, repo: str, ref: str, expected: str | None, creds: Credentials | None
    ) -> CachedManifest:
        """GET from upstream, verify against the digest we expect, store, and link its parts."""
        got = await upstream.get_manifest(repo, ref, ACCEPT_ALL, creds)
        manifest = _verified(upstream, repo, ref, got.body, got.media_type)
        return await self._store(upstream, repo, ref, manifest, expected or got.digest)

    async def _store(
        self, upstream: Upstream, repo: str, ref: str, manifest: CachedManifest, claimed: str | None
    ) -> CachedManifest:
        """Store a manifest upstream sent for `ref`, unless it is not the `claimed` digest, and
        link its parts."""
        if claimed and claimed != manifest.digest:
            self.metrics.digest_mismatches.labels(upstream.name).inc()
            log.error("discarded manifest %s:%s from %s: expected %s, content hashes to %s",
                      repo, ref, upstream.name, claimed, manifest.digest)
            raise RegistryError("MANIFEST_INVALID", 502, f"upstream {upstream.name} sent a manifest that does not match {claimed}")
        digest, body = manifest.digest, manifest.body
        if self.store.size(digest) is None:
            self.store.put(digest, body)
            if self.shared is not None:
                self.shared.publish_manifest(digest, body)
        await self.metadata.content.add(digest, len(body), manifest.media_type, "manifest", self.clock())
        await self.metadata.links.add(upstream.name, repo, [digest, *referenced_digests(body)])
        self._memory[digest] = manifest
        return manifest

    async def _load(self, digest: str) -> CachedManifest | None:
        cached = self._memory.get(digest)
        if cached is not None:
            return cached
        row = await self.metadata.content.get(digest)
        body = self.store.read(digest) if row is not None else None
        if body is None:
            return await self._load_shared(digest) if self.shared is not None else None
        media_type = media_type_of(body, row.media_type if row else None)
        if not media_type:
            return None
        cached = CachedManifest(digest, media_type, body)
        self._memory[digest] = cached
        return cached

    async def _load_shared(self, digest: str) -> CachedManifest | None:
        """A manifest another replica stored in the bucket, verified and kept here; None if the bucket
        lacks it or holds a blob there. Bytes that are not what their key says are deleted from the
        bucket. Callers check access and links."""
        assert self.shared is not None
        body = await self.shared.manifest(digest)
        if body is None:
            return None
        try:
            actual = digest_of(body)  # a signed schema1's digest covers its payload only
        except InvalidManifest:
            actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            log.error("discarded %s from the shared bucket: its content hashes to %s", digest, actual)
            await self.shared.discard(digest)
            return None
        media_type = media_type_of(body, None)
        if not media_type:
            return None  # a small blob (an image config): the manifest endpoint does not serve it
        self.store.put(digest, body)
        await self.metadata.content.add(digest, len(body), media_type, "manifest", self.clock())
        cached = self._memory[digest] = CachedManifest(digest, media_type, body)
        self.shared.used(digest)
        return cached

    # -- by tag --------------------------------------------------------------------
    async def _by_tag(self, upstream: Upstream, repo: str, tag: str, principal: Principal) -> Answer:
        row = await self.metadata.tags.get(upstream.name, repo, tag, self.clock())
        cached = await self._load(row.digest) if row else None
        if row and cached and self.clock() < row.expires_at:
            await self._allow(upstream, repo, principal, cached.digest)
            allows = self.access.still_allows(upstream, repo, principal)
            return _answer(cached, "hit", self._again(row.digest, lambda now: now < row.expires_at and allows(now)
                                                      and self.metadata.tags.cached(upstream.name, repo, tag) is row))
        # One deadline for the whole answer (access check, revalidation, access check again):
        # a cached tag goes out by it; a tag the cache lacks waits for upstream.
        deadline = revalidation_deadline(upstream)
        if not principal.fetches_as_itself:
            await self._allow(upstream, repo, principal, tag, deadline)
        absent_key = (upstream.name, repo, tag, fingerprint(principal.upstream))
        if (absent := self._absent.get(absent_key)) and self.clock() < absent[0]:
            raise UpstreamError(upstream.name, 404, absent[1])
        flight = ("tag", upstream.name, repo, tag, fingerprint(principal.upstream))
        revalidate = lambda: self.access.observe(upstream, repo, principal, self._flights.do(  # noqa: E731
            flight, lambda: self._revalidate(upstream, repo, tag, row, principal.upstream),
        ))
        try:
            if cached is None:
                return await revalidate()
            return await self.background.within(
                flight, deadline, revalidate, f"revalidation of {upstream.name}/{repo}:{tag}"
            )
        except Overdue:
            reason = "timeout"
            why = (f"no answer within {upstream.config.revalidate_timeout:g}s (revalidate_timeout);"
                   " revalidating in the background")
        except UpstreamError as exc:
            if exc.status == 404 and upstream.config.negative_ttl > 0:
                # a CI loop asking for a tag that is not there yet must not spend rate limit
                self._absent[absent_key] = (self.clock() + upstream.config.negative_ttl, exc.message)
            if not exc.outage or cached is None:
                raise
            reason, why = exc.reason, exc.message
        assert cached is not None  # either way here comes from a cached tag
        await self._allow(upstream, repo, principal, cached.digest, deadline)  # upstream's last word stands
        self.metrics.stale_served.labels(upstream.name, reason).inc()
        log.warning("serving stale %s/%s:%s (%s): %s", upstream.name, repo, tag, cached.digest, why)
        return _answer(cached, "stale")

    async def _revalidate(
        self, upstream: Upstream, repo: str, tag: str, row: TagRow | None, creds: Credentials | None
    ) -> Answer:
        """One HEAD; a GET only for content we do not hold. Raises UpstreamError for the caller.

        A client's HEAD of an unknown tag fetches the manifest too: clients follow it with a
        GET by digest (then a hit), and the tag is then known should upstream go away.
        """
        try:
            probe = await upstream.head_manifest(repo, tag, ACCEPT_ALL, creds)
        except UpstreamError:
            if row is not None:
                self.metrics.tag_revalidations.labels("error").inc()
            raise
        if probe.body is not None:  # upstream could only be asked with a GET: its body is here
            got = _verified(upstream, repo, tag, probe.body, probe.media_type)
            known = await self._load(got.digest)
            manifest = known or await self._store(upstream, repo, tag, got, None)
        else:
            known = await self._load(probe.digest) if probe.digest else None
            manifest = known or await self._fetch(upstream, repo, probe.digest or tag, probe.digest, creds)
        if row is not None:
            self.metrics.tag_revalidations.labels("unchanged" if row.digest == manifest.digest else "changed").inc()
        now = self.clock()
        await self.metadata.tags.put(
            TagRow(upstream.name, repo, tag, manifest.digest, manifest.media_type, now, now + upstream.config.tag_ttl)
        )
        if known is not None:
            await self.metadata.links.add(upstream.name, repo, [known.digest, *referenced_digests(known.body)])
        return _answer(manifest, "hit" if known is not None else "miss")

    async def _passthrough(
        self, upstream: Upstream, repo: str, ref: str, accept: list[str], principal: Principal
    ) -> Answer:
        """A client that cannot take the cached type gets what upstream gives for its own Accept."""
        got = await upstream.get_manifest(repo, ref, ", ".join(accept), principal.upstream)
        manifest = _verified(upstream, repo, ref, got.body, got.media_type)
        if got.digest and got.digest != manifest.digest:
            raise RegistryError("MANIFEST_INVALID", 502, f"upstream {upstream.name} sent a manifest that does not match {got.digest}")
        return _answer(manifest, "miss")


def _verified(upstream: Upstream, repo: str, ref: str, body: bytes, declared_type: str) -> CachedManifest:
    """A manifest as its bytes describe it: digest (schema1: of the signed payload) and media type.

    Raises MANIFEST_INVALID (502) for bytes that are no manifest or a schema1 that does not verify.
    """
    try:
        digest = digest_of(body)
    except InvalidManifest as exc:
        log.error("discarded manifest %s:%s from %s: %s", repo, ref, upstream.name, exc)
        raise RegistryError("MANIFEST_INVALID", 502, f"upstream {upstream.name} sent a signed manifest that does not verify: {exc}") from None
    media_type = media_type_of(body, declared_type)
    if media_type is None:
        sent = f" (sent as {declared_type[:80]!r})" if declared_type else ""
        raise RegistryError("MANIFEST_INVALID", 502, f"upstream {upstream.name} sent {repo}:{ref[:80]}{sent}, which is not a manifest")
    return CachedManifest(digest, media_type, body)
