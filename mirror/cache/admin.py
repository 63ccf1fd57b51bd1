"""Cache inspection and maintenance: stats, pins, purges and garbage collection.

The same operations run inside a running mirror (behind `/admin/`) and directly
on a stopped mirror's data directory (from the command line), so they never
race a server over its database. `perform` is the one way in for both.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, TypeVar

from mirror.cache.eviction import Evictor, pinned_digests, plan_images
from mirror.config import parse_duration
from mirror.errors import RegistryError
from mirror.reference import TAG_RE, parse_digest
from mirror.routing import Router
from mirror.proxy.shared import SharedContent
from mirror.storage.bucket import Bucket, BucketError
from mirror.storage.store import ContentStore
from mirror.storage.metadata import Metadata
from mirror.storage.reconcile import reconcile


T = TypeVar("T")


class AdminError(Exception):
    """A request the cache cannot carry out; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    upstream: str
    repo: str
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.upstream}/{self.repo}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


def parse_image(text: str, router: Router) -> ImageRef:
    """`alpine`, `alpine:3`, `ghcr.io/org/img:tag`, `quay.io/x/y@sha256:…` → an ImageRef."""
    name, _, digest = text.strip().partition("@")
    tag = None
    head, slash, last = name.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        name = head + slash + last
    try:
        if digest:
            parse_digest(digest)
        if tag is not None and not TAG_RE.fullmatch(tag):
            raise AdminError(f"{text!r}: invalid tag {tag!r}")
        upstream, repo = router.route(name, None)
    except RegistryError as exc:
        raise AdminError(f"{text!r}: {exc.message}") from None
    return ImageRef(upstream.name, repo, None if digest else tag or "latest", digest or None)


@dataclass
class CacheAdmin:
    store: ContentStore
    metadata: Metadata
    router: Router
    evictor: Evictor
    cap: Callable[[], int]
    clock: Callable[[], float] = time.time
    busy_tmp: Callable[[], set[str]] = set  # temp files of fetches in progress (kept by gc)
    hit_ratio: Callable[[], float | None] = lambda: None  # of requests since start (a running server)
    shared: SharedContent | None = None  # a fleet's bucket: purges and gc act on it too
    bucket_cap: int | None = None  # storage.s3.max_size in bytes

    async def _bucket(self, work: Callable[[Bucket], Awaitable[T]]) -> T | None:
        """`work` on the fleet's bucket, if there is one; AdminError if the bucket fails."""
        if self.shared is None:
            return None
        try:
            return await work(self.shared.bucket)
        except BucketError as exc:
            raise AdminError(f"the shared bucket failed: {exc}") from None

    async def _digest_of(self, image: ImageRef) -> str:
        if image.digest:
            if await self.metadata.content.get(image.digest) is None:
                raise AdminError(f"{image} is not cached: pull it first (e.g. `mirror warm {image}`)")
            return image.digest
        row = await self.metadata.tags.get(image.upstream, image.repo, image.ref)
        if row is None or await self.metadata.content.get(row.digest) is None:
            raise AdminError(f"{image} is not cached: pull it first (e.g. `mirror warm {image}`)")
        return row.digest

    async def stats(self, top: int = 10) -> dict[str, object]:
        await self.metadata.flush()  # this process's latest hits count too
        by_kind = await self.metadata.stats.usage_by_kind()
        oldest = await self.metadata.stats.oldest_access()
        return {
            "size_bytes": self.metadata.content.size,
            "max_bytes": self.cap(),
            "objects": {kind: n for kind, (n, _size) in by_kind.items()},
            "bytes_by_kind": {kind: size for kind, (_n, size) in by_kind.items()},
            "oldest_access": oldest,
            "hit_ratio": self.hit_ratio(),
            "pins": [f"{u}/{r}" + (f"@{ref}" if ":" in ref else f":{ref}") for u, r, ref in await self.metadata.pins.all()],
            "top_by_size": [{"repository": f"{u}/{r}", "bytes": b}
                            for u, r, b in await self.metadata.stats.repositories_by_size(top)],
            "top_by_hits": [{"repository": f"{u}/{r}", "hits": n} for u, r, n in await self.metadata.stats.top_hits(top)],
            **({"bucket": bucket} if (bucket := await self._bucket(self._bucket_stats)) is not None else {}),
        }

    async def _bucket_stats(self, bucket: Bucket) -> dict[str, object]:
        objects = await bucket.objects()
        return {"location": bucket.location, "objects": len(objects), "size_bytes": sum(o.size for o in objects),
                "max_bytes": self.bucket_cap}

    async def pin(self, text: str) -> dict[str, object]:
        image = parse_image(text, self.router)
        await self._digest_of(image)
        await self.metadata.pins.add(image.upstream, image.repo, image.ref)
        return {"pinned": str(image)}

    async def unpin(self, text: str) -> dict[str, object]:
        image = parse_image(text, self.router)
        if not await self.metadata.pins.remove(image.upstream, image.repo, image.ref):
            raise AdminError(f"{image} is not pinned")
        return {"unpinned": str(image)}

    async def purge(self, image: str | None = None, repo: str | None = None,
                    older_than: float | None = None) -> dict[str, object]:
        """Remove one image, a repository's content, or whatever was not used for a while.

        Parts another cached image uses stay; pinned content stays (unpin it first). With a fleet's
        bucket, what is removed here is removed from the bucket too (other replicas' own copies stay
        until they evict them), and `older_than` also removes what no replica used since.
        """
        if sum(x is not None for x in (image, repo, older_than)) != 1:
            raise AdminError("purge takes exactly one of: an image reference, --repo NAME, --older-than DURATION")
        await self.metadata.flush()
        pinned = await pinned_digests(self.metadata, self.store)
        plan = await asyncio.to_thread(plan_images, await self.metadata.content.usage(), self.store)
        doomed: set[str] = set()
        if image is not None:
            ref = parse_image(image, self.router)
            digest = await self._digest_of(ref)
            parts = next((u.closure for u in plan if u.root == digest), None) or {digest}
            others = set().union(*(u.closure for u in plan if u.root not in parts))
            doomed = (parts - others) | {digest}
            if ref.tag:
                await self.metadata.tags.drop(ref.upstream, ref.repo, ref.tag)
        elif repo is not None:
            try:
                up, name = self.router.route(repo, None)
            except RegistryError as exc:
                raise AdminError(f"{repo!r}: {exc.message}") from None
            upstream = up.name
            only_here, _shared = await self.metadata.links.of_repository(upstream, name)
            doomed = only_here & set(plan.sizes)
            await self.metadata.forget_repository(upstream, name)
        else:
            assert older_than is not None
            cutoff = self.clock() - older_than
            for unit in plan:
                if unit.last_access < cutoff:
                    doomed.update(unit.release())
        kept = doomed & pinned
        doomed -= pinned
        await self.evictor.remove(sorted(doomed))
        answer: dict[str, object] = {"removed": len(doomed), "bytes": sum(plan.sizes.get(d, 0) for d in doomed),
                                     "kept_pinned": len(kept)}
        if self.shared is not None:
            unused: set[str] = set()
            if older_than is not None:
                cutoff = self.clock() - older_than
                objects = await self._bucket(lambda b: b.objects()) or []
                unused = {o.digest for o in objects if o.used < cutoff} - pinned
            await self._bucket(lambda b: b.delete(sorted(doomed | unused)))
            answer["removed_from_bucket"] = len(doomed | unused)
        return answer

    async def gc(self) -> dict[str, object]:
        """Reconcile rows with files, remove temp files no fetch is writing, and abort uploads
        to the fleet's bucket that a crash left (begun more than a day ago)."""
        dropped, adopted = await reconcile(self.store, self.metadata)
        busy = self.busy_tmp()
        stale = self.store.remove_temp_files(busy)
        answer: dict[str, object] = {"dropped_rows": dropped, "adopted_files": adopted, "removed_temp_files": stale}
        aborted = await self._bucket(lambda b: b.sweep(self.clock()))
        if aborted is not None:
            answer["aborted_uploads"] = aborted  # multipart uploads a crashed replica left in the bucket
        return answer


@dataclass(frozen=True)
class Operation:
    arguments: tuple[str, ...]  # the keys its arguments may have
    changes: bool  # False for a read: safe to repeat (over HTTP, a GET)


OPERATIONS = {
    "stats": Operation((), changes=False),
    "pin": Operation(("ref",), changes=True),
    "unpin": Operation(("ref",), changes=True),
    "purge": Operation(("ref", "repo", "older_than"), changes=True),
    "gc": Operation((), changes=True),
}


async def perform(admin: CacheAdmin, op: str, arguments: Mapping[str, object]) -> dict[str, object]:
    """Carry out operation `op` of OPERATIONS with `arguments` (a JSON object's members).

    `ref` and `repo` are strings (an image reference, a repository name); `older_than`
    is a duration ("30d", "12h") or a number of seconds. Raises AdminError, changing
    nothing, for an unknown operation or argument, a value of the wrong type, and
    whatever the operation itself refuses.
    """
    operation = OPERATIONS.get(op)
    if operation is None:
        raise AdminError(f"unknown operation {op!r} (known: {', '.join(OPERATIONS)})")
    unknown = sorted(set(arguments) - set(operation.arguments))
    if unknown:
        takes = ", ".join(operation.arguments) or "no arguments"
        raise AdminError(f"{op} takes {takes}; not {', '.join(unknown)}")
    names: dict[str, str] = {}  # ref and repo
    for key in ("ref", "repo"):
        if key in arguments:
            value = arguments[key]
            if not isinstance(value, str):
                raise AdminError(f"{op}: {key} must be a string")
            names[key] = value
    if op == "stats":
        return await admin.stats()
    if op in ("pin", "unpin"):
        ref = names.get("ref", "").strip()
        if not ref:
            raise AdminError(f"{op} needs an image reference (ref)")
        return await (admin.pin(ref) if op == "pin" else admin.unpin(ref))
    if op == "purge":
        older_than = None
        if "older_than" in arguments:
            try:
                older_than = parse_duration(arguments["older_than"])
            except ValueError as exc:
                raise AdminError(f"purge: older_than: {exc}") from None
        return await admin.purge(image=names.get("ref"), repo=names.get("repo"), older_than=older_than)
    return await admin.gc()
