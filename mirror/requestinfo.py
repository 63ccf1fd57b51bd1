"""Typed per-request facts that handlers record and the access log and metrics read."""
from aiohttp import web

KIND = web.RequestKey("kind", str)  # manifest, blob, tags, base, other
RESULT = web.RequestKey("result", str)  # hit, miss, stale, coalesced, denied, error
