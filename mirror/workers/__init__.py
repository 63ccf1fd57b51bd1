"""Several worker processes sharing the listening port (`server.workers`).

The primary worker does everything a single process does; secondaries serve
what the cache holds and hand every other request to the primary over a unix
socket, so each fetch still happens once and one process writes the cache.
"""
