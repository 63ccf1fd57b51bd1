"""A secondary worker follows the primary's growing temp file instead of copying a blob through the socket.

Asked to (`X-Mirror-Follow`), the primary answers a blob miss with the headers
the client is to get, the temp file's name, and then a stream of short messages
instead of the bytes:

- `F` + offset (8 bytes, big-endian): the file holds what the client needs up to
  that offset, released as for the primary's own readers (the last byte only
  once the whole blob hashed to its digest);
- `D` + length + bytes: bytes held in memory only (the disk filled up).

The secondary sends file stretches to its client with sendfile, as the primary
would. If the fetch fails the primary cuts the stream short, and the secondary
cuts its client off, so a bad blob reaches nobody whole. The secondary opens the
file before it sends its client anything; if the fetch was stored and the blob
evicted before it could, it asks the primary again without following (`Vanished`).

Only the whole blob or one range is followed. Several ranges (a multipart/byteranges
answer: a zstd:chunked table of contents, or chunks of it) come whole through the
socket, framing and bytes, as the primary writes them for its own clients.
"""
from __future__ import annotations

import contextlib
import re
import struct
from typing import BinaryIO

import aiohttp
from aiohttp import web

from mirror.responses import sending
from mirror.proxy.inflight import Fetch
from mirror.reference import parse_digest
from mirror.requestinfo import BODY_LENGTH, from_secondary
from mirror.storage.store import ContentStore

FOLLOW = "X-Mirror-Follow"  # secondary → primary: answer a blob miss with its temp file and progress
TEMP_FILE = "X-Mirror-Temp-File"  # primary → secondary: the temp file's name in tmp/
_HEADER = struct.Struct(">cQ")
_FIRST_BYTE = re.compile(r"bytes (\d+)-")


def wants_follow(request: web.Request) -> bool:
    return from_secondary(request) and request.headers.get(FOLLOW) == "1"


async def send_progress(request: web.Request, resp: web.StreamResponse, fetch: Fetch, start: int, end: int) -> None:
    """Primary: describe [start, end) of `fetch` to a following secondary as it becomes available."""
    resp.headers[TEMP_FILE] = fetch.tmp_name
    resp.headers[BODY_LENGTH] = str(end - start)
    resp.content_length = None  # the messages are chunked; the client's length travels in BODY_LENGTH
    await resp.prepare(request)
    # aclosing: a follower that leaves stops holding back a pass-through (full disk) at once
    async with contextlib.aclosing(fetch.spans(start, end)) as spans:
        async for span in spans:
            if span.data is None:
                await resp.write(_HEADER.pack(b"F", span.offset + span.count))
            else:
                await resp.write(_HEADER.pack(b"D", len(span.data)) + span.data)


class Vanished(Exception):
    """Neither the temp file nor the stored blob is there (stored, then evicted): nothing was sent."""


def _open(store: ContentStore, temp_name: str, digest: str) -> BinaryIO:
    """The temp file, or the blob itself if the fetch was committed (renamed) meanwhile.

    Raises FileNotFoundError if both are gone, OSError for a name that is not a temp file's.
    """
    try:
        return store.open_temp(temp_name)
    except FileNotFoundError:
        if (file := store.open(digest)) is None:
            raise FileNotFoundError(f"neither the temp file {temp_name!r} nor {digest} is there") from None
        return file


def is_followed(answer: aiohttp.ClientResponse) -> bool:
    return TEMP_FILE in answer.headers


async def relay(request: web.Request, answer: aiohttp.ClientResponse, response: web.StreamResponse,
                store: ContentStore) -> None:
    """Secondary: send the client what the primary's messages describe; raise if they stop short.

    `response` carries the primary's status and headers; its body comes from the temp file.
    Raises Vanished, before anything is sent, if neither that file nor the blob can be opened;
    ClientGone if the client goes away.
    """
    total = int(answer.headers[BODY_LENGTH])
    first = _FIRST_BYTE.match(answer.headers.get("Content-Range", ""))
    pos = int(first.group(1)) if first else 0
    end = pos + total
    digest = parse_digest(request.path.rsplit("/", 1)[1])
    for name in (TEMP_FILE, BODY_LENGTH):
        response.headers.popall(name, None)
    response.content_length = total
    try:
        file = _open(store, answer.headers[TEMP_FILE], digest)
    except FileNotFoundError as exc:
        raise Vanished(str(exc)) from None
    with file:
        await response.prepare(request)
        while pos < end:
            kind, value = _HEADER.unpack(await answer.content.readexactly(_HEADER.size))
            if kind == b"F":
                await sending.send_file(request, file, pos, value - pos)
                pos = value
            elif kind == b"D":
                await response.write(await answer.content.readexactly(value))
                pos += value
            else:
                raise ConnectionResetError(f"unexpected message {kind!r} from the primary")
    await response.write_eof()
