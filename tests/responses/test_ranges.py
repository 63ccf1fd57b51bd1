"""Range parsing, conditionals and multipart framing (RFC 9110 §13, §14), without a server."""
from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from mirror.responses.ranges import MAX_RANGES, ByteRange, Multipart, RangeNotSatisfiable, parse_ranges, select
from tests.byteranges import parse_byteranges

ETAG = f'"sha256:{"a" * 64}"'


@pytest.mark.parametrize(("header", "want"), [
    ("bytes=0-9", [(0, 10)]),
    ("bytes=990-", [(990, 1000)]),
    ("bytes=-10", [(990, 1000)]),
    ("bytes=-5000", [(0, 1000)]),  # a suffix longer than the blob is all of it
    ("bytes=500-99999", [(500, 1000)]),  # clipped at the end
    ("bytes=0-0,-1", [(0, 1), (999, 1000)]),
    ("bytes=10-19, 30-39 ,\t50-59", [(10, 20), (30, 40), (50, 60)]),  # optional whitespace
    ("bytes=10-19,,30-39,", [(10, 20), (30, 40)]),  # empty list elements are skipped
    ("BYTES=1-2", [(1, 3)]),  # the unit is case-insensitive
    ("bytes=900-999,0-9", [(900, 1000), (0, 10)]),  # the order asked is kept
    ("bytes=0-9,10-19", [(0, 10), (10, 20)]),  # adjacent ranges stay apart
    ("bytes=0-9,5000-6000", [(0, 10)]),  # an unsatisfiable range among others is left out
    ("bytes=0-0,999999999999999999999999-", [(0, 1)]),
    ("bytes=0-9,5-14", [(0, 10), (5, 15)]),  # overlapping, as Go's http.ServeContent serves them
    ("bytes=0-0,0-0", [(0, 1), (0, 1)]),
    ("bytes=-10,990-", [(990, 1000), (990, 1000)]),
])
def test_satisfiable_ranges(header: str, want: list[tuple[int, int]]) -> None:
    assert parse_ranges(header, 1000) == tuple(ByteRange(*r) for r in want)


@pytest.mark.parametrize("header", [
    "bytes=1000-", "bytes=5000-6000,7000-", "bytes=-0",  # nothing satisfiable
    "bytes=abc", "bytes=10-5", "bytes=--1", "bytes=1-2-3", "bytes=-", "bytes=", "bytes= , ",
    "items=0-1", "bytes 0-1", "bytes=0x1-2", "bytes=١-٢",  # malformed (Arabic-Indic digits too)
])
def test_unsatisfiable_and_malformed_ranges_are_refused(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_ranges(header, 1000)


def test_a_zero_length_blob_satisfies_no_range() -> None:
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_ranges(header, 0)


@pytest.mark.parametrize("header", [
    "bytes=0-999,0-999", "bytes=0-,0-", "bytes=-600,0-500",  # overlaps adding up to more than the blob
    "bytes=" + "0-0," * 500 + "0-0",  # hundreds of ranges
])
def test_ranges_that_would_send_more_than_the_blob_are_ignored(header: str) -> None:
    assert parse_ranges(header, 1000) is None


def test_more_ranges_than_the_cap_are_ignored() -> None:
    at_cap = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES))
    assert parse_ranges(at_cap, 100_000) == tuple(ByteRange(i * 10, i * 10 + 2) for i in range(MAX_RANGES))
    hundreds = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(300))
    assert parse_ranges(hundreds, 100_000) is None


def _request(**headers: str):  # type: ignore[no-untyped-def]
    return make_mocked_request("GET", "/", headers=headers)


def test_conditionals_come_first_then_if_range_then_range() -> None:
    assert select(_request(), 1000, ETAG).status == 200
    assert select(_request(Range="bytes=0-1"), 1000, ETAG).ranges == (ByteRange(0, 2),)
    assert select(_request(Range="bytes=0-1"), None, ETAG).status == 200  # no size, no ranges
    for match in (ETAG, f"W/{ETAG}", "*", f'"other", {ETAG}'):
        assert select(_request(**{"If-None-Match": match, "Range": "bytes=0-1"}), 1000, ETAG).status == 304
    assert select(_request(**{"If-None-Match": '"other"'}), 1000, ETAG).status == 200
    assert select(_request(**{"If-Range": ETAG, "Range": "bytes=0-1"}), 1000, ETAG).status == 206
    for stale in ('"other"', f"W/{ETAG}", "Tue, 15 Nov 1994 08:12:31 GMT"):  # strong comparison; no dates
        assert select(_request(**{"If-Range": stale, "Range": "bytes=0-1"}), 1000, ETAG).status == 200
    with pytest.raises(RangeNotSatisfiable):
        select(_request(Range="bytes=5000-"), 1000, ETAG)


def test_multipart_framing_and_length() -> None:
    data = bytes(range(256)) * 4
    rs = (ByteRange(10, 20), ByteRange(500, 1024))
    framing = Multipart(rs, len(data))
    body = b"".join(head + data[r.start:r.stop] for head, r in zip(framing.heads, rs)) + framing.tail
    assert len(body) == framing.length
    assert parse_byteranges(framing.content_type, body) == [
        ("application/octet-stream", "bytes 10-19/1024", data[10:20]),
        ("application/octet-stream", "bytes 500-1023/1024", data[500:]),
    ]
    assert Multipart(rs, len(data)).boundary != framing.boundary
