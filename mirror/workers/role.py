"""What a worker process is told by its supervisor."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerRole:
    """Worker `index` of a group: 0 is the primary. Paths come from the supervisor."""

    index: int
    primary_socket: str  # the primary's unix socket: secondaries hand it what they cannot serve
    metrics_dir: str  # prometheus_client's multiprocess directory

    @property
    def primary(self) -> bool:
        return self.index == 0
