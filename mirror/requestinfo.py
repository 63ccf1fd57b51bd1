"""Typed per-request facts that handlers record and the access log and metrics read."""
from aiohttp import web

KIND = web.RequestKey("kind", str)  # manifest, blob, tags, referrers, catalog, base, other
RESULT = web.RequestKey("result", str)  # hit, miss, stale, coalesced, denied, error
FORWARDED = web.RequestKey("forwarded", bool)  # handed to the primary worker, which logs and counts it
SENT_BY_SENDFILE = web.RequestKey("sent_by_sendfile", int)  # body bytes that bypassed the response's writer

# Set by a secondary worker on what it hands the primary: who the client is and how it connected.
CLIENT_ADDRESS = "X-Mirror-Client-Address"
CLIENT_SCHEME = "X-Mirror-Client-Scheme"
HANDED_BY = "X-Mirror-Worker"  # the index of the worker that handed it over
BODY_LENGTH = "X-Mirror-Body-Length"  # what a followed answer stands for (see responses.follow)


def from_secondary(request: web.BaseRequest) -> bool:
    """Whether the request came over the primary's unix socket, which only sibling workers can open."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), (str, bytes))


def client_address(request: web.BaseRequest) -> str | None:
    """The client's address, also for requests a secondary worker handed over."""
    return request.headers.get(CLIENT_ADDRESS) if from_secondary(request) else request.remote


def client_scheme(request: web.BaseRequest) -> str:
    """http or https, as the client connected (to this worker or to the one that handed it over)."""
    return request.headers.get(CLIENT_SCHEME, "http") if from_secondary(request) else request.scheme


def handed_by(request: web.BaseRequest) -> int | None:
    """The secondary worker that handed this request over, if one did."""
    value = request.headers.get(HANDED_BY, "") if from_secondary(request) else ""
    return int(value) if value.isdigit() else None
