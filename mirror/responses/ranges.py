"""What part of a blob a request selects: its conditionals and byte ranges (RFC 9110 §13, §14),
and the framing of several ranges as one `multipart/byteranges` body (RFC 9110 §14.6).

A blob's only validator is its entity tag, `"<digest>"`: it never changes, and it is the
same whether the blob comes from the cache or from upstream. `If-None-Match` is read with
aiohttp's `request.if_none_match`. aiohttp's `request.http_range` takes a single range only
(and reads `bytes=-0` as the whole representation), and `request.if_range` only dates, so
`Range` and an entity-tag `If-Range` are read here, by the grammar of RFC 9110 §14.1.2 and
§13.1.5.

Bad ranges cost bounded work (the header is at most 64 KiB) and never an error of ours: a
malformed `Range` (a unit other than bytes, a reversed range, garbage) is refused with 416
as distribution refuses it. Ranges that overlap are served as asked while together they
are no longer than the blob, as Go's `http.ServeContent` (which distribution serves blobs
with) does; beyond that, and beyond `MAX_RANGES` ranges, the Range header is ignored and
the whole blob is sent (RFC 9110 §14.2): podman asks for up to 1024 chunks of a
zstd:chunked layer at once, and takes a 200.
"""
from __future__ import annotations

import re
import secrets
from typing import NamedTuple

from aiohttp import web
from aiohttp.helpers import ETAG_ANY

MAX_RANGES = 64  # ranges served in one multipart answer; beyond that the whole blob goes out
PART_TYPE = "application/octet-stream"
_INT_RANGE = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)
_BIG = 1 << 63  # any position written with more digits than this needs is past every blob


class ByteRange(NamedTuple):
    """Bytes [start, stop) of a blob."""

    start: int
    stop: int

    def content_range(self, size: int) -> str:
        """The `Content-Range` value of this range of a `size`-byte blob (RFC 9110 §14.4)."""
        return f"bytes {self.start}-{self.stop - 1}/{size}"


class RangeNotSatisfiable(Exception):
    """416: the Range header is malformed, or none of its ranges lies within the blob."""


class Selection(NamedTuple):
    """The answer a request selects: 200 (the whole blob), 206 (`ranges`, in the order asked)
    or 304 (not modified: no body)."""

    status: int
    ranges: tuple[ByteRange, ...] = ()


def select(request: web.BaseRequest, size: int | None, etag: str) -> Selection:
    """Evaluate `If-None-Match`, `If-Range` and `Range` against a blob of `size` bytes (None:
    not known, so ranges cannot be served) whose entity tag is `etag` (quoted).

    The order is RFC 9110 §13.2.2's: If-None-Match (weak comparison, §13.1.2) first, then
    Range, applied only if If-Range holds (strong comparison, §13.1.5; a date never holds, as
    blobs carry no Last-Modified). HEAD selects as GET does. Raises RangeNotSatisfiable.
    """
    if _none_match_fails(request, etag):
        return Selection(304)
    header = request.headers.get("Range")
    if header is None or size is None or not _if_range_holds(request.headers.get("If-Range"), etag):
        return Selection(200)
    ranges = parse_ranges(header, size)
    return Selection(200) if ranges is None else Selection(206, ranges)


def _none_match_fails(request: web.BaseRequest, etag: str) -> bool:
    tags = request.if_none_match
    if tags is None:
        return False
    return any(tag.value == ETAG_ANY or f'"{tag.value}"' == etag for tag in tags)


def _if_range_holds(header: str | None, etag: str) -> bool:
    """Whether `If-Range` lets Range apply: absent, or exactly our strong entity tag."""
    return header is None or header.strip() == etag


def parse_ranges(header: str, size: int) -> tuple[ByteRange, ...] | None:
    """The satisfiable ranges of a `Range: bytes=…` header for a `size`-byte blob, in the
    order asked, each clipped to the blob (RFC 9110 §14.1.2: `a-b`, `a-`, `-n`, separated by
    commas with optional whitespace; empty list elements are skipped, §5.6.1).

    None when the header is to be ignored: more than MAX_RANGES ranges, or ranges that add up
    to more than the blob (only overlapping ones can). Ranges past the end are left out
    (§14.1.1); raises RangeNotSatisfiable when none is left, or when the header is malformed.
    """
    unit, equals, spec = header.strip().partition("=")
    if not equals or unit.lower() != "bytes":
        raise RangeNotSatisfiable(f"malformed Range header {header[:100]!r}: expected bytes=START-END[, …]")
    elements = [e for e in (e.strip(" \t") for e in spec.split(",")) if e]
    if not elements:
        raise RangeNotSatisfiable(f"malformed Range header {header[:100]!r}: no range")
    ranges = []
    for element in elements:
        found = _INT_RANGE.fullmatch(element)
        if found is None or found.group(1) == found.group(2) == "":
            raise RangeNotSatisfiable(f"malformed range {element[:40]!r}: expected START-END, START- or -LENGTH")
        first, last = found.groups()
        if first == "":  # a suffix: the last N bytes
            if (length := _position(last)) > 0 and size > 0:
                ranges.append(ByteRange(max(size - length, 0), size))
            continue
        start = _position(first)
        if last and _position(last) < start:
            raise RangeNotSatisfiable(f"malformed range {element[:40]!r}: it ends before it starts")
        if start < size:
            ranges.append(ByteRange(start, size if last == "" else min(_position(last) + 1, size)))
    if not ranges:
        raise RangeNotSatisfiable(f"range {header[:100]!r} is outside the blob's {size} bytes")
    if len(ranges) > MAX_RANGES or sum(r.stop - r.start for r in ranges) > size:
        return None
    return tuple(ranges)


def _position(digits: str) -> int:
    """A byte position; Python refuses to read numbers of thousands of digits, and none is needed."""
    return int(digits) if len(digits) <= 18 else _BIG


class Multipart:
    """The framing of several ranges of a `size`-byte blob as one `multipart/byteranges` body
    (RFC 9110 §14.6, RFC 2046 §5.1.1): before each range's bytes its `heads` entry (delimiter,
    Content-Type, Content-Range, blank line), after the last one `tail` (the close delimiter).

    `length` is the whole body's, for Content-Length; the boundary is random, so it does not
    occur in the blob.
    """

    def __init__(self, ranges: tuple[ByteRange, ...], size: int, part_type: str = PART_TYPE) -> None:
        self.ranges = ranges
        self.boundary = secrets.token_hex(16)
        self.content_type = f"multipart/byteranges; boundary={self.boundary}"
        # the CRLF before a delimiter belongs to the delimiter: every part but the first starts with it
        delimiters = [f"--{self.boundary}\r\n", f"\r\n--{self.boundary}\r\n"]
        self.heads = [
            f"{delimiters[i > 0]}Content-Type: {part_type}\r\nContent-Range: {r.content_range(size)}\r\n\r\n".encode()
            for i, r in enumerate(ranges)
        ]
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.length = sum(map(len, self.heads)) + sum(r.stop - r.start for r in ranges) + len(self.tail)
