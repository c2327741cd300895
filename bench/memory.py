"""Resident memory of each process of a running `bentoml serve`, at rest and at its peak (Linux /proc)."""

from __future__ import annotations

import threading
from pathlib import Path

PROC = Path("/proc")


def process_name(pid: int) -> str:
    """The service a BentoML worker runs (`--service-name`; "sheaf" is the entry service)."""
    args = (PROC / str(pid) / "cmdline").read_bytes().decode().split("\0")
    if "--service-name" in args:
        return args[args.index("--service-name") + 1]
    return "bentoml serve (arbiter)"


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def rss_mb(server_pid: int) -> dict[str, float]:
    """RSS in MB of `bentoml serve` and each of its workers, by service name."""
    sizes: dict[str, float] = {}
    for pid in [server_pid, *descendants(server_pid)]:
        try:
            status = (PROC / str(pid) / "status").read_text()
            name = process_name(pid)
        except OSError:
            continue
        rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        sizes[name] = sizes.get(name, 0.0) + rss_kb / 1024
    return sizes


class PeakRSS:
    """Samples `rss_mb` every `interval_s` while in a `with` block; `peak` holds each process's highest."""

    def __init__(self, server_pid: int, interval_s: float = 0.1) -> None:
        self.server_pid = server_pid
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for name, size in rss_mb(self.server_pid).items():
                self.peak[name] = max(size, self.peak.get(name, 0.0))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
