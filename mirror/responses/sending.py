"""Bodies sent to clients that may go away at any moment.

A client that closes its connection mid-answer is normal (a cancelled pull, a
timeout on its side, a CI job killed): it is worth a debug line and a count in
`mirror_client_disconnects_total{kind}`, never an error with a traceback, and it
does not stop the shared fetch the others are reading.

`loop.sendfile` does not say so plainly: on a transport that is already closing
it raises `RuntimeError("Transport is closing")`, and when the peer resets during
the copy it raises an OSError. `send_file` turns both into `ClientGone`, a
ConnectionResetError like the one aiohttp raises for a write to a closed
connection, so callers handle every departure with one `except ConnectionError`.
"""
from __future__ import annotations

import asyncio
from typing import BinaryIO

from aiohttp import web

from mirror.requestinfo import SENT_BY_SENDFILE


class ClientGone(ConnectionResetError):
    """The client closed its connection before its answer was whole."""


async def send_file(request: web.Request, file: BinaryIO, offset: int, count: int) -> None:
    """Send `count` bytes of `file` from `offset` to the request's client with sendfile.

    Raises ClientGone if the client went away before or during the copy (the
    connection is then aborted: its framing is broken, so it must not be reused);
    any other failure (reading the file) propagates as it is.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone("the client went away")
    try:
        await asyncio.get_running_loop().sendfile(transport, file, offset, count)
    except (RuntimeError, OSError) as exc:
        if not (isinstance(exc, ConnectionError) or transport.is_closing()):
            raise
        transport.abort()
        raise ClientGone(f"the client went away: {exc}") from exc
    # sendfile bypasses the response's writer, which counts what the access log reports
    request[SENT_BY_SENDFILE] = request.get(SENT_BY_SENDFILE, 0) + count
