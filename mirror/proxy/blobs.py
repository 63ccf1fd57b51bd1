"""Blobs: what the cache holds is opened, what it lacks joins one shared upstream fetch.

Content present on disk but not yet linked to the requested repository is
confirmed with one upstream HEAD in that repository before it is served, so a
digest is never reachable through a repository upstream does not hold it in.
Content stored as a manifest is confirmed the same way: the blob endpoint serves
only what upstream serves as a blob (distribution does not serve manifests there).

`BlobService.get` answers with a domain result, never an HTTP response: a `BlobHit`
(the stored file, open), a `BlobFetch` (the shared fetch, started and joined) or, for
a HEAD of a blob the cache lacks, a `BlobHead` (what upstream says of it). Turning
them into responses (ETag, conditionals, ranges, sendfile) is `mirror.responses.blobs`'s.
When upstream sends a blob without Content-Length, its size comes from the descriptors
of the repository's cached manifests, else from an upstream HEAD.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.proxy.access import AccessPolicy, Principal
from mirror.proxy.inflight import Fetch, FetchFailed, Inflight, SourceGone
from mirror.proxy.shared import SharedContent
from mirror.storage.metadata import Metadata
from mirror.storage.sizes import descriptor_size
from mirror.storage.store import ContentStore
from mirror.upstream.client import Upstream
from mirror.upstream.credentials import Credentials
from mirror.upstream.errors import UpstreamError

log = logging.getLogger("mirror.blobs")


@dataclass(frozen=True, slots=True)
class BlobHit:
    """A stored blob of `size` bytes, `file` open on it (held from before the checks: eviction
    may unlink the blob, and the open file is still whole). Whoever receives it closes `file`."""

    digest: str
    size: int
    file: BinaryIO
    result: str = "hit"

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True, slots=True)
class BlobFetch:
    """The shared upstream fetch of a blob the cache lacks, started (upstream answered, so its
    `size` is known unless upstream and the cache both lack it) and joined as a reader: read it
    with `fetch.spans`, then `close` (leave it). `result` is miss (this request started it) or
    coalesced (it joined one running)."""

    fetch: Fetch
    result: str

    @property
    def digest(self) -> str:
        return self.fetch.digest

    @property
    def size(self) -> int | None:
        return self.fetch.size

    def close(self) -> None:
        self.fetch.leave()


@dataclass(frozen=True, slots=True)
class BlobRedirect:
    """A blob the fleet's bucket holds, of `size` bytes, for the client to fetch from `url`
    (presigned, short-lived: `[storage.s3] redirect`)."""

    digest: str
    size: int
    url: str
    result: str = "hit"

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BlobHead:
    """A HEAD of a blob the cache lacks: upstream (or the fleet's bucket) has it, of `size` bytes
    (None: not known)."""

    digest: str
    size: int | None
    result: str = "miss"

    def close(self) -> None:
        pass


BlobAnswer = BlobHit | BlobFetch | BlobHead | BlobRedirect


def _hashes_to(file: BinaryIO, digest: str) -> bool:
    """Whether the whole of `file` hashes to `digest` (read with pread: its position is not touched)."""
    h = hashlib.sha256()
    fd, offset = file.fileno(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return "sha256:" + h.hexdigest() == digest


class BlobService:
    def __init__(
        self, store: ContentStore, metadata: Metadata, inflight: Inflight, access: AccessPolicy,
        clock: Callable[[], float] = time.time, shared: SharedContent | None = None,
    ) -> None:
        """`shared`: the fleet's bucket, asked for what this replica lacks (unless `inflight` is a
        secondary worker's: the primary does that), and where hits are redirected to if configured."""
        self.store = store
        self.shared = shared
        self.metadata = metadata
        self.inflight = inflight
        self.access = access
        self.clock = clock
        # (upstream, repository, digest) of content stored as a manifest that upstream serves as a blob there
        self._served_as_blob: LRUCache[tuple[str, str, str], bool] = LRUCache(10_000)

    async def get(self, upstream: Upstream, repo: str, digest: str, principal: Principal, head: bool,
                  redirectable: bool = False) -> BlobAnswer:
        """The blob `digest` of `repo` for `principal`, for a GET or (`head`) a HEAD; a BlobRedirect
        only if `redirectable` (a GET of the whole blob or of one range) and redirects are configured.

        The caller owns the answer and must `close` it. Raises RegistryError: the access
        check's 401/403, BLOB_UNKNOWN (404) and upstream's other refusals as
        `UpstreamError.to_registry_error` maps them, UNAVAILABLE (503) for a fetch that failed
        before upstream answered.
        """
        fetch = self.inflight.join(digest)
        # Held open from here on (no await before this): eviction may unlink the blob while the
        # checks below wait on the database or upstream, and an open file is still sent whole.
        file = self._open(digest) if fetch is None else None
        try:
            if file is not None:
                await self._allow(upstream, repo, digest, principal)
                await self._a_blob_there(upstream, repo, digest, principal, file)
                await self._linked(upstream, repo, digest, principal)
                self.metadata.content.touch((digest,), self.clock())
                size = os.fstat(file.fileno()).st_size
                if self.shared is not None:
                    self.shared.used(digest)
                    if redirectable and self.shared.redirect and (redirect := await self._redirect(digest, size)):
                        return redirect
                hit, file = BlobHit(digest, size, file), None
                return hit
            if fetch is None and self.shared is not None and not self.inflight.local_only:
                shared = await self._from_shared(upstream, repo, digest, principal, head, redirectable)
                if shared is not None:
                    return shared
            if fetch is not None or not principal.fetches_as_itself:
                await self._allow(upstream, repo, digest, principal)
            if fetch is None:
                fetch = self.inflight.join(digest)  # another request may have started it meanwhile
            if fetch is None and head:
                return await self._head_miss(upstream, repo, digest, principal)
            if fetch is not None:
                if (fetch.upstream, fetch.repo) != (upstream.name, repo):
                    await self._linked(upstream, repo, digest, principal)
                await fetch.wait_started()
                answer, fetch = BlobFetch(fetch, "coalesced"), None
                return answer
            fetch = self.inflight.start(upstream, repo, digest, principal.upstream, self._stored,
                                        lambda: self._size_of(upstream, repo, digest, principal.upstream))
            # upstream's answer to our GET tells whether it lets this principal read
            await self.access.observe(upstream, repo, principal, fetch.wait_started())
            answer, fetch = BlobFetch(fetch, "miss"), None
            return answer
        except UpstreamError as exc:
            raise exc.to_registry_error("BLOB_UNKNOWN") from None
        except FetchFailed as exc:
            raise RegistryError("UNAVAILABLE", 503, str(exc)) from None
        finally:
            if file is not None:
                file.close()
            if fetch is not None:
                fetch.leave()

    async def _from_shared(self, upstream: Upstream, repo: str, digest: str, principal: Principal, head: bool,
                           redirectable: bool) -> BlobAnswer | None:
        """What another replica stored in the bucket, after the same checks as a hit (access, and
        upstream's link: this replica has no row for it); None if the bucket lacks it."""
        assert self.shared is not None
        size = await self.shared.size(digest)
        if size is None:
            return None
        await self._allow(upstream, repo, digest, principal)
        await self._linked(upstream, repo, digest, principal)
        if head:
            return BlobHead(digest, size, "hit")
        if redirectable and self.shared.redirect:
            return BlobRedirect(digest, size, await self.shared.url(digest))
        self.shared.used(digest)
        shared = self.shared
        fetch = self.inflight.join(digest) or self.inflight.fill(
            digest, upstream.name, repo, lambda: shared.download(digest), self._stored, lambda: shared.discard(digest))
        try:
            await fetch.wait_started()
        except SourceGone:
            fetch.leave()
            return None  # evicted since it was asked for: fetched from upstream instead
        except BaseException:
            fetch.leave()
            raise
        return BlobFetch(fetch, "hit")

    async def _redirect(self, digest: str, size: int) -> BlobRedirect | None:
        """A redirect to what the bucket holds of a blob stored here too; None (the bytes are sent
        from here) if the bucket lacks it or fails: its failure is counted, and the hit still served."""
        assert self.shared is not None
        try:
            if await self.shared.size(digest) is None:
                return None
        except RegistryError as exc:
            log.warning("sending %s from the local copy: %s", digest, exc.message)
            return None
        return BlobRedirect(digest, size, await self.shared.url(digest))

    def _open(self, digest: str) -> BinaryIO | None:
        """The stored blob, open for reading; None if it is not stored (or was just evicted)."""
        return self.store.open(digest)

    async def _allow(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """The access check, probing with a HEAD of this very blob (which also proves the link)."""
        await self.access.ensure(upstream, repo, principal, lambda creds: self._confirm(upstream, repo, digest, creds))

    async def _linked(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> None:
        """Make sure `repo` holds `digest` upstream before serving it through that repository."""
        if not await self.metadata.links.contains(upstream.name, repo, digest):
            await self._confirm(upstream, repo, digest, principal.upstream)

    async def _confirm(self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None) -> None:
        """One upstream HEAD: does `repo` really hold `digest`? Then link it."""
        await upstream.head_blob(repo, digest, creds)
        await self.metadata.links.add(upstream.name, repo, [digest])

    async def _a_blob_there(self, upstream: Upstream, repo: str, digest: str, principal: Principal,
                            file: BinaryIO) -> None:
        """Stored content not known as a blob (a manifest, or a file whose row is not written yet)
        is served through /blobs/ only where upstream serves it as a blob: one HEAD says so, or
        raises UpstreamError (404 → BLOB_UNKNOWN). Manifests are linked to their repositories
        too, so a link alone does not say it."""
        key = (upstream.name, repo, digest)
        kind = await self.metadata.content.kind(digest)
        if kind == "blob" or key in self._served_as_blob:
            return
        await upstream.head_blob(repo, digest, principal.upstream)
        # a signed schema1 manifest is stored with its signatures: those bytes are not the blob
        if kind == "manifest" and not await asyncio.to_thread(_hashes_to, file, digest):
            raise RegistryError("BLOB_UNKNOWN", 404, f"{digest} is cached as a signed manifest, not as this blob")
        self._served_as_blob[key] = True

    async def _head_miss(self, upstream: Upstream, repo: str, digest: str, principal: Principal) -> BlobHead:
        size = await self.access.observe(upstream, repo, principal, upstream.head_blob(repo, digest, principal.upstream))
        if size is None:
            size = await descriptor_size(self.metadata, self.store, upstream.name, repo, digest)
        return BlobHead(digest, size)

    async def _size_of(self, upstream: Upstream, repo: str, digest: str, creds: Credentials | None) -> int | None:
        """The size of a blob upstream sends without Content-Length: what the repository's cached
        manifests say, else what an upstream HEAD says; None if neither knows (then it goes out chunked)."""
        size = await descriptor_size(self.metadata, self.store, upstream.name, repo, digest)
        if size is None:
            try:
                size = await upstream.head_blob(repo, digest, creds)
            except UpstreamError as exc:
                log.info("no size for %s in %s: %s", digest, repo, exc)
        if size is None:
            log.warning("%s from %s/%s has no known size: sending it chunked", digest, upstream.name, repo)
        return size

    async def _stored(self, fetch: Fetch) -> None:
        now = self.clock()
        await self.metadata.content.add(fetch.digest, fetch.written, None, "blob", now)
        await self.metadata.links.add(fetch.upstream, fetch.repo, [fetch.digest])
