"""URLs an upstream conversation meets: origins (what a token or credential is bound to),
registry API paths and their scopes, redirect targets, and URLs fit for logs."""
from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

_API_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> str:
    """`scheme://host:port` of a URL (RFC 6454), the port made explicit: what a token or
    credential is bound to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def shown(url: str) -> str:
    """A URL for messages and logs: no query (presigned URLs carry signatures there), no userinfo."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def api_scope(url: str) -> str | None:
    """`repository:<name>:pull` for a registry API URL (`/v2/<name>/manifests/…` and the like)."""
    match = _API_PATH.match(urlsplit(url).path)
    return f"repository:{match['name']}:pull" if match else None


def resolve(base: str, location: str) -> str | None:
    """`location` resolved against the URL that sent it (RFC 3986 §5: `/x`, `../x`, `//host/x`);
    None unless the result is an http(s) URL with a host."""
    try:
        parts = urlsplit(urljoin(base, location.strip()))
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.port == 0:
            return None
    except ValueError:  # an unbalanced IPv6 bracket, a port that is not a number
        return None
    return parts._replace(fragment="").geturl()
