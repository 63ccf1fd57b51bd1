"""May this principal read this repository? Upstream decides; we remember its answers.

Cached content is served to a principal only after upstream let that principal
read the repository: an anonymous client needs an anonymous HEAD to have
succeeded, a client with credentials a HEAD with those credentials. Answers are
trusted for the upstream's `access_ttl` and kept in the metadata database (by
credential fingerprint, never the secret); while the upstream is down or
throttling, the last answer stands, across restarts too (upstream cannot have
refused in the meantime), and with no answer at all nothing cached is served. `share_with_anonymous` is the
operator's opt-out for trusted networks.

An expired answer is asked again within the upstream's `revalidate_timeout`: an upstream that
hangs is an upstream that cannot answer, so past it the last answer stands while the question
finishes in the background (`Background`, which the other services that revalidate cached
answers use too).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from cachetools import LRUCache

from mirror.errors import RegistryError
from mirror.proxy.revalidation import Background, Overdue, revalidation_deadline
from mirror.storage.metadata import Metadata
from mirror.upstream.credentials import Credentials, fingerprint
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError

DENIAL_TTL = 30.0
T = TypeVar("T")

Probe = Callable[[Credentials | None], Awaitable[object]]


@dataclass(frozen=True)
class Principal:
    """Who asks (`client`, None when anonymous) and whose credentials go upstream for them."""

    client: Credentials | None
    upstream: Credentials | None

    @property
    def name(self) -> str:
        return fingerprint(self.client)

    @property
    def fetches_as_itself(self) -> bool:
        """True when upstream requests made for this principal also prove its own access."""
        return self.client == self.upstream


def principal_for(client: Credentials | None, upstream: Upstream) -> Principal:
    """A client without credentials borrows the upstream's service account, if one is set."""
    return Principal(client, client or upstream.service_account)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    at: float
    message: str = ""


class AccessPolicy:
    def __init__(self, metadata: Metadata, clock: Callable[[], float] = time.time, maxsize: int = 100_000) -> None:
        self._metadata = metadata
        self._clock = clock
        self._decisions: LRUCache[tuple[str, str, str], Decision] = LRUCache(maxsize)
        self.background = Background()  # re-checks of expired decisions past their deadline

    def _record(self, key: tuple[str, str, str], allowed: bool, message: str = "") -> None:
        decision = Decision(allowed, self._clock(), message)
        self._decisions[key] = decision
        self._metadata.access.record(*key, allowed, decision.at, message)

    async def _known(self, key: tuple[str, str, str], ttl: Callable[[Decision], float]) -> Decision | None:
        """The last decision; one remembered but expired is read again, as another worker
        process may have asked upstream since."""
        known = self._decisions.get(key)
        if known is None or self._clock() - known.at >= ttl(known):
            if (row := await self._metadata.access.get(*key)) is not None:
                known = self._decisions[key] = Decision(*row)
        return known

    def still_allows(self, upstream: Upstream, repo: str, principal: Principal) -> Callable[[float], bool]:
        """Whether `ensure` would let `principal` read `repo` at a time, from what is in memory alone
        (the same decision as now, not expired): a test to repeat, with what it needs looked up once."""
        if principal.client is None and upstream.config.share_with_anonymous:
            return lambda now: True
        key, ttl = (upstream.name, repo, principal.name), upstream.config.access_ttl
        decision = self._decisions.get(key)
        if decision is None or not decision.allowed:
            return lambda now: False
        return lambda now: now - decision.at < ttl and self._decisions.get(key) is decision

    async def learn(self, upstream: Upstream, repo: str, principal: Principal, error: UpstreamError | None) -> None:
        """Learn from an upstream answer to a request made with the principal's own credentials."""
        if not principal.fetches_as_itself:
            return
        key = (upstream.name, repo, principal.name)
        if error is None:
            known = self._decisions.get(key)
            if not (known and known.allowed and self._clock() - known.at < upstream.config.access_ttl / 2):
                self._record(key, True)
        elif error.status in (401, 403):
            self._record(key, False, error.message)

    async def observe(self, upstream: Upstream, repo: str, principal: Principal, work: Awaitable[T]) -> T:
        """Await upstream work done with the principal's credentials, learning its access from the answer."""
        try:
            result = await work
        except UpstreamError as exc:
            await self.learn(upstream, repo, principal, exc)
            raise
        await self.learn(upstream, repo, principal, None)
        return result

    async def ensure(
        self, upstream: Upstream, repo: str, principal: Principal, probe: Probe, deadline: float | None = None,
    ) -> None:
        """Return if `principal` may read `repo`; raise 401/403 (or upstream's failure) if not.

        `probe(credentials)` asks upstream (a HEAD of what is about to be served) and raises
        UpstreamError for its refusal or failure. When upstream allowed the principal before and
        that answer expired, upstream has until `deadline` (event loop time; default: its
        `revalidate_timeout` from now) to answer again; past it the last answer stands and the
        probe finishes in the background, recording what upstream says. Without such an answer
        upstream's own timeouts apply: nothing is served on a guess.
        """
        if principal.client is None and upstream.config.share_with_anonymous:
            return
        key = (upstream.name, repo, principal.name)
        ttl = lambda d: upstream.config.access_ttl if d.allowed else DENIAL_TTL  # noqa: E731
        known = await self._known(key, ttl)
        if known is not None and self._clock() - known.at < ttl(known):
            if known.allowed:
                return
            raise denied(upstream, repo, principal, known.message)
        recheck = lambda: self._recheck(key, probe, principal.client)  # noqa: E731
        try:
            if known is not None and known.allowed:
                until = revalidation_deadline(upstream) if deadline is None else deadline
                await self.background.within(key, until, recheck, f"access check of {repo} on {upstream.name}")
            else:
                await recheck()
        except Overdue:
            return  # upstream cannot answer in time: its last answer stands
        except UpstreamError as exc:
            if exc.outage and known is not None and known.allowed:
                return  # upstream cannot answer: its last answer stands
            if exc.status in (401, 403):
                raise denied(upstream, repo, principal, exc.message) from None
            raise

    async def _recheck(self, key: tuple[str, str, str], probe: Probe, client: Credentials | None) -> None:
        """Ask upstream with the probe and record its answer: allowed, or refused (401/403).

        Raises the probe's UpstreamError.
        """
        try:
            await probe(client)
        except UpstreamError as exc:
            if exc.status in (401, 403):
                self._record(key, False, exc.message)
            raise
        self._record(key, True)


def denied(upstream: Upstream, repo: str, principal: Principal, why: str) -> RegistryError:
    """401 for anonymous clients (so they come back with credentials), 403 for refused credentials."""
    text = f"access to {repo} on {upstream.name} refused by the upstream"
    if why:
        text += f" ({why.removeprefix(f'upstream {upstream.name}: ')})"
    if principal.client is None:
        return RegistryError("UNAUTHORIZED", 401, text + "; log in to pull it")
    return RegistryError("DENIED", 403, text)
