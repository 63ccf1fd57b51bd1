"""The referrers API (OCI distribution-spec 1.1, "Listing Referrers"): passed through, cached briefly.

`GET /v2/<name>/referrers/<digest>[?artifactType=<type>]` answers an image index of the
manifests whose `subject` is `<digest>`. Access is checked as for manifests (the subject
is probed with a HEAD as the principal), the answer is kept per principal for a short
time and stands in while upstream is down. An upstream without the API (404) gives an
empty index, as the spec asks of registries; an `artifactType` filter upstream did not
apply is applied here, and `OCI-Filters-Applied: artifactType` says it was.

With an answer cached, the access check and the request to upstream share one deadline, the
upstream's `revalidate_timeout`; past it the cached answer goes out while the request finishes
in the background and refreshes it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

from yarl import URL

from mirror.errors import RegistryError
from mirror.mediatypes import MANIFEST_TYPES, OCI_INDEX
from mirror.proxy.access import AccessPolicy, Principal
from mirror.proxy.revalidation import AnswerCache, revalidation_deadline
from mirror.upstream.credentials import fingerprint
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError

FRESH_FOR = 30.0
ARTIFACT_TYPE_MAX = 255
FILTER = "artifactType"
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)
EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()


@dataclass(frozen=True)
class Referrers:
    """An image index to send, and whether it was filtered by `artifactType`."""

    body: bytes
    filtered: bool
    result: str  # hit, miss, stale


class ReferrersService:
    def __init__(self, access: AccessPolicy, clock: Callable[[], float] = time.time) -> None:
        self.access = access
        self._cache: AnswerCache[Referrers] = AnswerCache(FRESH_FOR, clock)
        self.background = self._cache.background  # refreshes past the revalidation deadline

    async def get(
        self, upstream: Upstream, repo: str, digest: str, artifact_type: str | None, principal: Principal
    ) -> Referrers:
        """The referrers of `digest` in `repo` visible to `principal`.

        Raises RegistryError: 401/403 when upstream would refuse the principal, upstream's
        failure when nothing cached can stand in, 400 for an unusable `artifactType`.
        """
        if artifact_type is not None and not 0 < len(artifact_type) <= ARTIFACT_TYPE_MAX:
            raise RegistryError("UNSUPPORTED", 400, f"artifactType must be 1 to {ARTIFACT_TYPE_MAX} characters")
        deadline = revalidation_deadline(upstream)
        try:
            await self.access.ensure(
                upstream, repo, principal, lambda creds: upstream.head_manifest(repo, digest, ACCEPT_ALL, creds),
                deadline,
            )
        except UpstreamError as exc:
            if exc.status == 404:  # an unknown subject has no referrers; the spec wants 200 and an empty list
                return Referrers(EMPTY_INDEX, artifact_type is not None, "miss")
            raise exc.to_registry_error("MANIFEST_UNKNOWN") from None
        key = (upstream.name, repo, digest, artifact_type, fingerprint(principal.upstream))
        try:
            answer, result = await self._cache.get(
                key, upstream, lambda: self._ask(upstream, repo, digest, artifact_type, principal),
                f"referrers of {upstream.name}/{repo}@{digest}", deadline,
            )
        except UpstreamError as exc:
            raise exc.to_registry_error("MANIFEST_UNKNOWN") from None
        return Referrers(answer.body, answer.filtered, result)

    async def _ask(
        self, upstream: Upstream, repo: str, digest: str, artifact_type: str | None, principal: Principal
    ) -> Referrers:
        query = URL.build(query={FILTER: artifact_type}).raw_query_string if artifact_type else ""
        try:
            body, applied = await upstream.get_referrers(repo, digest, query, principal.upstream)
        except UpstreamError as exc:
            if exc.status == 404:  # no referrers API upstream
                return Referrers(EMPTY_INDEX, artifact_type is not None, "miss")
            raise
        index = _index(body, upstream.name)
        if artifact_type is None:
            return Referrers(body, False, "miss")
        if FILTER.lower() in (f.strip().lower() for f in applied.split(",")):
            return Referrers(body, True, "miss")
        index["manifests"] = [m for m in index["manifests"]
                              if isinstance(m, dict) and m.get("artifactType") == artifact_type]
        return Referrers(json.dumps(index).encode(), True, "miss")


def _index(body: bytes, upstream: str) -> dict[str, object]:
    """Upstream's answer as an image index; anything else is upstream's failure (502)."""
    try:
        index = json.loads(body)
    except ValueError:
        index = None
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise UpstreamError(upstream, 502, "referrers answer is not an image index")
    return index

