"""CPU time and memory of running processes, read from /proc.

CPU comes from `/proc/PID/task/*/schedstat` (nanoseconds on a CPU, per thread) when
the process kept the same threads through the window, and otherwise from
`/proc/PID/stat` (utime + stime, in 10 ms clock ticks, which also counts threads that
exited). With `children`, waited-for children count too (how a shell loop's curl
calls are charged to it); that is only known in ticks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # The command name may hold spaces and parentheses; the fields start after the last ')'.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU of `pid` so far; with `children`, of its waited-for children too."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def thread_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each live thread of `pid` has spent on a CPU."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size in KiB."""
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size in KiB."""
    return _status_kib(pid, "VmHWM")


def pss_kib(pid: int) -> int:
    """Proportional set size in KiB (shared pages split between their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


@dataclass(slots=True)
class CpuMeter:
    """CPU seconds of one process over a window: `start()`, later `stop()`."""

    pid: int
    children: bool = False
    started: float | None = None
    started_ns: dict[int, int] | None = None
    used: float | None = None
    precise: bool = False

    def start(self) -> None:
        """Open the window."""
        self.started_ns = None if self.children else thread_ns(self.pid)
        self.started = cpu_seconds(self.pid, children=self.children)

    def stop(self) -> float:
        """Close the window; the CPU seconds spent in it."""
        assert self.started is not None
        ticks = cpu_seconds(self.pid, children=self.children) - self.started
        now_ns = None if self.children else thread_ns(self.pid)
        if (
            self.started_ns is not None
            and now_ns is not None
            and now_ns.keys() == self.started_ns.keys()
        ):
            self.used = sum(now_ns[t] - self.started_ns[t] for t in now_ns) / 1e9
            self.precise = True
        else:
            self.used = ticks
        return self.used
