"""Side-by-side benchmark of the mirror against the direct upstream, nginx (sendfile),
distribution's proxy mode and drayage, on loopback. Run it with `python -m bench --help`.

Modules: `procs` (processes, ports, RSS sampling), `httpclient` (a lean blocking HTTP/1.1
client), `seed` (the seeded upstream's content), `systems` (start/stop each system under
test), `loadgen` (the concurrent client, run in its own process), `scenarios`, `report`.
"""
