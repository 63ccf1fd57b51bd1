"""CPU time of process trees, read from /proc: user + system seconds, so a figure can be put per
byte served ("CPU seconds per GB") and compared across systems that run on the same machine."""
from __future__ import annotations

import os

from bench.procs import process_tree

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# A named group of processes: the roots of the trees whose CPU is summed (e.g. "mirrors": every
# replica's supervisor, whose workers are its children).
Groups = dict[str, list[int]]


def _process_cpu(pid: int) -> float:
    """utime + stime of `pid`, plus cutime + cstime (its children that exited and were reaped, so
    CPU used by a worker that ended between two readings is not lost); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # Fields after the command name (which may hold spaces and parentheses): state is the first,
    # utime, stime, cutime and cstime the 12th to 15th.
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / _TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by `pid` and its descendants (100 Hz ticks on Linux: ±0.01 s)."""
    return sum(_process_cpu(p) for p in process_tree(pid))


def snapshot(groups: Groups) -> dict[str, float]:
    """CPU seconds per group, now."""
    return {name: sum(tree_cpu(pid) for pid in pids) for name, pids in groups.items()}


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each group used between two snapshots of the same groups."""
    return {name: after[name] - before[name] for name in before}


def machine_busy() -> float:
    """CPU seconds all CPUs of the machine have been busy (not idle nor waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def own_and_reaped() -> float:
    """CPU seconds of this process and of its children that have ended and been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
