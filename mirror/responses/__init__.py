"""Response shaping: the services' domain answers turned into HTTP responses.

`blobs` (ETag, conditionals, ranges, sendfile from a stored file or a growing one),
`follow` (a secondary worker sending a blob miss from the primary's growing temp file),
`documents` (manifests, tag lists, referrers, the catalog), `ranges` (the Range and
conditional headers, multipart/byteranges framing) and `sending` (sendfile to a client
that may leave). Services never build a response; handlers in `mirror.routes` call
them and hand their answers here, and `mirror.workers.forward` relays through `follow`.
"""
