"""The supervisor's listening sockets: one per worker and address, all on one port."""
from __future__ import annotations

import socket

import pytest

from mirror.workers.supervisor import listen


def test_every_worker_gets_a_socket_on_every_address_of_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def both(host: str, port: int, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host != "dual.test":  # a name that resolves to an IPv4 and an IPv6 address
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        return real("127.0.0.1", port, *args, **kwargs) + real("::1", port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    groups = listen("dual.test", 0, 3)
    try:
        assert len(groups) == 3 and all(len(group) == 2 for group in groups)
        port = groups[0][0].getsockname()[1]
        assert {(s.family, s.getsockname()[0], s.getsockname()[1]) for group in groups for s in group} == {
            (socket.AF_INET, "127.0.0.1", port), (socket.AF_INET6, "::1", port)}
        with socket.create_connection(("::1", port), timeout=5), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # both addresses accept (queued until a worker takes them)
    finally:
        for s in (s for group in groups for s in group):
            s.close()
