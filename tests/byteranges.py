"""Reading `multipart/byteranges` answers strictly, as RFC 9110 §14.6 and RFC 2046 §5.1.1 frame them."""
from __future__ import annotations

import re

_BOUNDARY = re.compile(r"multipart/byteranges;\s*boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})$")


def parse_byteranges(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """(Content-Type, Content-Range, bytes) of each part, in order; AssertionError on any
    framing fault (missing delimiters, stray bytes, a part without its headers)."""
    found = _BOUNDARY.fullmatch(content_type)
    assert found, content_type
    boundary = found.group(1).encode()
    first, tail = b"--" + boundary + b"\r\n", b"\r\n--" + boundary + b"--\r\n"
    assert body.startswith(first) and body.endswith(tail), body[:80]
    parts = []
    for chunk in body[len(first):-len(tail)].split(b"\r\n--" + boundary + b"\r\n"):
        head, separator, data = chunk.partition(b"\r\n\r\n")
        assert separator, chunk[:80]
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert set(fields) == {"Content-Type", "Content-Range"}, fields
        parts.append((fields["Content-Type"], fields["Content-Range"], data))
    return parts
