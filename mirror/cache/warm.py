"""Pre-pull images through a running mirror, exactly as clients would, so the cache is warm.

Each reference's manifest is fetched by tag (for an index: the chosen platforms,
all by default), then every blob, bodies streamed and discarded: the mirror
stores them on the way. Progress goes to a terminal as bars (tqdm) and to logs
as periodic plain lines.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp
from tqdm import tqdm

from mirror.manifest import image_blobs
from mirror.mediatypes import INDEX_TYPES, MANIFEST_TYPES

ACCEPT = ", ".join(MANIFEST_TYPES)
REPORT_EVERY = 5.0


class WarmError(Exception):
    pass


@dataclass
class Outcome:
    ref: str
    bytes: int = 0
    fetched: bool = False  # something came from upstream (not everything was cached)
    error: str | None = None


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def lines(self) -> list[str]:
        pulled = [o for o in self.outcomes if not o.error and o.fetched]
        cached = [o for o in self.outcomes if not o.error and not o.fetched]
        total = sum(o.bytes for o in self.outcomes)
        out = [f"warm: {len(pulled)} pulled, {len(cached)} already cached, {len(self.failed)} failed, "
               f"{total / 2**20:.1f} MiB"]
        out += [f"  failed {o.ref}: {o.error}" for o in self.failed]
        return out


def split_ref(ref: str) -> tuple[str, str]:
    """`name[:tag][@digest]` → (name as the mirror's path takes it, tag or digest)."""
    name, _, digest = ref.partition("@")
    head, slash, last = name.rpartition("/")
    tag = "latest"
    if ":" in last:
        last, tag = last.split(":", 1)
    return head + slash + last, digest or tag


class Progress:
    """Bars on a terminal; one plain line every few seconds elsewhere (CI logs)."""

    def __init__(self, total_images: int, stream: TextIO) -> None:
        self.tty = stream.isatty()
        self.stream = stream
        self.done_images = 0
        self.total_images = total_images
        self.bytes = 0
        self._last = time.monotonic()
        self._bar = tqdm(total=None, unit="B", unit_scale=True, desc="total", file=stream, position=0) if self.tty else None
        self._images = tqdm(total=total_images, unit="img", desc="images", file=stream, position=1) if self.tty else None

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        elif time.monotonic() - self._last >= REPORT_EVERY:
            self._last = time.monotonic()
            print(f"warm: {self.done_images}/{self.total_images} images, {self.bytes / 2**20:.1f} MiB", file=self.stream)

    def image_done(self, outcome: Outcome) -> None:
        self.done_images += 1
        if self._images is not None:
            self._images.update(1)
            self._images.set_postfix_str(outcome.ref[-40:])
        else:
            state = "failed" if outcome.error else ("pulled" if outcome.fetched else "cached")
            print(f"warm: [{self.done_images}/{self.total_images}] {outcome.ref} {state} "
                  f"({outcome.bytes / 2**20:.1f} MiB)", file=self.stream)

    def close(self) -> None:
        for bar in (self._bar, self._images):
            if bar is not None:
                bar.close()


class Warmer:
    def __init__(self, session: aiohttp.ClientSession, url: str, platforms: list[str], progress: Progress,
                 authorization: str | None) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.platforms = platforms
        self.progress = progress
        self.authorization = authorization

    async def _headers(self) -> dict[str, str]:
        if self.authorization is None:
            async with self.session.get(f"{self.url}/token") as resp:
                if resp.status != 200:
                    raise WarmError(f"{self.url}/token answered {resp.status}")
                self.authorization = f"Bearer {(await resp.json())['token']}"
        return {"Authorization": self.authorization}

    async def _get(self, path: str, outcome: Outcome, accept: str | None = None) -> bytes | None:
        """GET a path; manifests are returned, blob bodies only counted."""
        headers = await self._headers()
        if accept:
            headers["Accept"] = accept
        async with self.session.get(f"{self.url}{path}", headers=headers) as resp:
            if resp.status != 200:
                try:
                    message = (await resp.json())["errors"][0]["message"]
                except (ValueError, KeyError, IndexError, TypeError, aiohttp.ContentTypeError):
                    message = resp.reason or ""
                raise WarmError(f"{path}: {resp.status} {message}")
            if resp.headers.get("X-Mirror-Cache") not in ("hit", "stale"):
                outcome.fetched = True
            if accept:
                body = await resp.read()
                outcome.bytes += len(body)
                return body
            async for chunk in resp.content.iter_chunked(1 << 20):
                outcome.bytes += len(chunk)
                self.progress.advance(len(chunk))
            return None

    async def warm(self, ref: str) -> Outcome:
        outcome = Outcome(ref)
        try:
            name, reference = split_ref(ref)
            body = await self._get(f"/v2/{name}/manifests/{reference}", outcome, ACCEPT)
            manifests = [json.loads(body or b"{}")]
            if manifests[0].get("mediaType") in INDEX_TYPES or "manifests" in manifests[0]:
                children = [m for m in manifests[0].get("manifests", []) if self._wanted(m.get("platform") or {})]
                if not children:
                    raise WarmError(f"no manifest for platform(s) {', '.join(self.platforms)}")
                manifests = [json.loads(await self._get(f"/v2/{name}/manifests/{m['digest']}", outcome, ACCEPT) or b"{}")
                             for m in children]
            blobs = {digest for m in manifests for digest in image_blobs(m)}
            for digest in sorted(blobs):
                await self._get(f"/v2/{name}/blobs/{digest}", outcome)
        except (WarmError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            outcome.error = str(exc) or type(exc).__name__
        self.progress.image_done(outcome)
        return outcome

    def _wanted(self, platform: dict[str, str]) -> bool:
        if not self.platforms:
            return platform.get("os") != "unknown"  # attestation manifests are not images
        name = f"{platform.get('os')}/{platform.get('architecture')}"
        variant = f"{name}/{platform['variant']}" if platform.get("variant") else name
        return name in self.platforms or variant in self.platforms


async def warm(url: str, refs: list[str], platforms: list[str], jobs: int, authorization: str | None = None,
               stream: TextIO = sys.stderr) -> Summary:
    """Warm every reference, `jobs` at a time; never raises for a single image's failure."""
    progress = Progress(len(refs), stream)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for ref in refs:
        queue.put_nowait(ref)
    summary = Summary()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        warmer = Warmer(session, url, platforms, progress, authorization)

        async def worker() -> None:
            while not queue.empty():
                summary.outcomes.append(await warmer.warm(queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(max(1, jobs))))
    progress.close()
    return summary
