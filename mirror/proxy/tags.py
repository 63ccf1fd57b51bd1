"""Tag lists pass through, with a short cache that also stands in while upstream is down.

Pagination (distribution spec, "Listing Tags"): `n` and `last` go upstream URL-encoded,
and upstream's `Link` to the next page is rewritten to the mirror's own route for the
same repository, addressed as the client addressed it (path prefix or `?ns=`), so a
client paging through never leaves the mirror or lands on another registry. A `Link`
the mirror cannot read as "the next page of this repository at this upstream" is dropped.

A cached list older than FRESH_FOR is asked again within the upstream's `revalidate_timeout`;
past it the cached list goes out while the request finishes in the background and refreshes it.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from multidict import MultiMapping
from yarl import URL

from mirror.errors import RegistryError
from mirror.proxy.revalidation import AnswerCache
from mirror.upstream.credentials import Credentials, fingerprint
from mirror.upstream.client import Upstream
from mirror.upstream.errors import UpstreamError

FRESH_FOR = 30.0
PAGE_MAX = 10_000  # larger `n` are refused, as distribution refuses them
VALUE_MAX = 1024
EXTRA_MAX = 4
_ENTRY_SPLIT = re.compile(r",(?=\s*<)")
_ENTRY = re.compile(r"\s*<([^>]*)>(.*)", re.S)


@dataclass(frozen=True)
class Page:
    """Which page of a tag list: `n` entries after `last`, and any continuation parameters
    an upstream put in its own next-page link (quay.io's `next_page` token), all optional."""

    n: int | None = None
    last: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def query(self) -> list[tuple[str, str]]:
        first = [(k, str(v)) for k, v in (("n", self.n), ("last", self.last)) if v is not None]
        return first + list(self.extra)


def parse_page(query: MultiMapping[str]) -> Page:
    """The page a query asks for (`ns`, the mirror's own, left out).

    Raises PAGINATION_NUMBER_INVALID (400) for an `n` that is not a number up to PAGE_MAX,
    and for parameters too long or too many to be a page.
    """
    n, last = query.get("n"), query.get("last")
    if n is not None and not (n.isascii() and n.isdigit() and len(n) <= 6 and int(n) <= PAGE_MAX):
        raise RegistryError("PAGINATION_NUMBER_INVALID", 400,
                            f"invalid n={n[:20]!r}: expected a number of tags from 0 to {PAGE_MAX}")
    extra = tuple((k, v) for k, v in query.items() if k not in ("n", "last", "ns"))
    if len(extra) > EXTRA_MAX or any(len(k) + len(v) > VALUE_MAX for k, v in (*extra, ("last", last or ""))):
        raise RegistryError("PAGINATION_NUMBER_INVALID", 400,
                            f"too many or too long query parameters for a tag list page (at most {EXTRA_MAX} extra,"
                            f" {VALUE_MAX} characters each)")
    return Page(int(n) if n is not None else None, last, extra)


def next_page(link: str | None, answered: str) -> Page | None:
    """The next page upstream's `Link` header points at, or None.

    `answered` is the URL of the tag list that carried the header (after redirects: through
    registry.k8s.io it is a regional host's, whose path names the repository its own way).
    Accepts what registries send: `</v2/<repo>/tags/list?last=x&n=100>; rel="next"`, an
    absolute URL on that origin, no `rel` at all (quay.io), continuation parameters (kept,
    for the client to bring back). Anything else — another host, scheme or port, another
    repository or endpoint, a `rel` other than next, a bad `n`, garbage — is None: the
    mirror never follows or relays it.
    """
    if not link:
        return None
    for target, params in _links(link):
        rels = params.get("rel", "next").lower().split()
        if "next" not in rels:
            continue
        base = URL(answered).with_query(None).with_fragment(None)
        try:
            url = base.join(URL(target))
        except (ValueError, TypeError):
            return None
        if _origin(url) != _origin(base) or url.path != base.path:
            return None
        try:
            page = parse_page(url.query)
        except RegistryError:
            return None
        return page if page.last is not None or page.extra else None  # without them it is this page again
    return None


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").lower(), url.port


def _links(header: str) -> list[tuple[str, dict[str, str]]]:
    """The `<target>; name=value; …` entries of a Link header (RFC 8288), leniently: entries
    are split only before a `<`, so a comma inside a target does not cut it."""
    found = []
    for entry in _ENTRY_SPLIT.split(header):
        match = _ENTRY.fullmatch(entry)
        if match is None:
            continue
        target, rest = match.groups()
        params = {}
        for param in rest.split(";")[1:]:
            name, eq, value = param.partition("=")
            if name.strip() and eq:
                params[name.strip().lower()] = value.strip().strip('"')
        found.append((target.strip(), params))
    return found


def mirror_link(name: str, ns: str | None, page: Page) -> str:
    """The `Link` header a client gets: the next page on this mirror, routed as it routed this one."""
    query = page.query() + ([("ns", ns)] if ns is not None else [])
    return f'<{URL.build(path=f"/v2/{name}/tags/list", query=query)}>; rel="next"'


class TagListService:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._cache: AnswerCache[tuple[bytes, Page | None]] = AnswerCache(FRESH_FOR, clock)
        self.background = self._cache.background  # refreshes past the revalidation deadline

    async def get(
        self, upstream: Upstream, repo: str, page: Page, creds: Credentials | None
    ) -> tuple[bytes, Page | None, str]:
        """(body, next page or None, result) for `/v2/<repo>/tags/list`, cached per principal.

        Raises RegistryError: upstream's refusal, or its outage when nothing is cached.
        """
        async def ask() -> tuple[bytes, Page | None]:
            body, link, answered = await upstream.get_tags(repo, URL.build(query=page.query()).raw_query_string, creds)
            return body, next_page(link, answered)

        try:
            (body, following), result = await self._cache.get(
                (upstream.name, repo, page, fingerprint(creds)), upstream, ask, f"tag list of {upstream.name}/{repo}"
            )
        except UpstreamError as exc:
            raise exc.to_registry_error("NAME_UNKNOWN") from None
        return body, following, result
