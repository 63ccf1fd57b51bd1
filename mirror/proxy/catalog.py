"""`/v2/_catalog`: the cached repositories the caller may read, paginated as distribution does.

A repository is listed when the mirror holds content of it and upstream's last word
on the caller reading it was yes (or its upstream is `share_with_anonymous` and the
caller is anonymous). Names are shown as the client would address them: the default
upstream's as they are (`library/alpine`), other upstreams' behind their host
(`ghcr.io/org/app`). `?n=` and `?last=` page through them in lexical order, with
`Link: </v2/_catalog?last=…&n=…>; rel="next"` while more follow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from multidict import MultiMapping
from yarl import URL

from mirror.errors import RegistryError
from mirror.proxy.access import Principal
from mirror.routing import Router
from mirror.storage.metadata import Metadata

PAGE_DEFAULT = 1000
PAGE_MAX = 10_000


@dataclass(frozen=True)
class Catalog:
    body: bytes
    link: str | None  # the next page on this mirror, when there is one


class CatalogService:
    def __init__(self, metadata: Metadata, router: Router) -> None:
        self.metadata = metadata
        self.router = router

    async def list(self, principal: Principal, query: MultiMapping[str]) -> Catalog:
        """One page of `{"repositories": [...]}` for `principal`.

        Raises PAGINATION_NUMBER_INVALID (400) for an `n` that is not a number up to PAGE_MAX.
        """
        n, last = _page(query)
        open_upstreams = [name for name, up in self.router.upstreams.items()
                          if principal.client is None and up.config.share_with_anonymous]
        found = await self.metadata.access.readable_repositories(principal.name, open_upstreams)
        names = sorted(self._shown(upstream, repo) for upstream, repo in found)
        if last is not None:
            names = [name for name in names if name > last]
        page = names[:n]
        link = None
        if len(names) > n and page:
            link = f'<{URL.build(path="/v2/_catalog", query={"last": page[-1], "n": str(n)})}>; rel="next"'
        return Catalog(json.dumps({"repositories": page}).encode(), link)

    def _shown(self, upstream: str, repo: str) -> str:
        return repo if upstream == self.router.default.name else f"{upstream}/{repo}"


def _page(query: MultiMapping[str]) -> tuple[int, str | None]:
    n = query.get("n")
    if n is None:
        return PAGE_DEFAULT, query.get("last")
    if not (n.isascii() and n.isdigit() and len(n) <= 6 and int(n) <= PAGE_MAX):
        raise RegistryError("PAGINATION_NUMBER_INVALID", 400,
                            f"invalid n={n[:20]!r}: expected a number of repositories from 0 to {PAGE_MAX}")
    return int(n), query.get("last")
