"""`python -m bench.before_after COMMIT [NAME,...]`: this tree against the code at COMMIT, both
served at once and measured in turns (A B A B), so that the machine's drift moves both alike.

Per deployment: the p50 overhead of `/predict` over the raw backend call at concurrency 1,
closed-loop throughput at each concurrency, and the servers' CPU per request at the highest
concurrency (which drifts with the machine much less than throughput does), each the median
of `TURNS` turns. The code at COMMIT is checked out in a git worktree and served from there
with this environment.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.load import closed_loop
from bench.run import BACKENDS, CONCURRENCY, configs, overhead_ms, requests
from bench.stamped import STAMPS_ENV
from sheaf.backends.base import limit_torch_threads
from tests.conftest import ROOT, Server, serve
from tiny.models import build_tiny_causal_lm

TURNS = 3


def main(commit: str, names: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="sheaf-before-after-"))
    os.environ["SHEAF_CACHE_DIR"] = str(work / "cache")
    os.environ[STAMPS_ENV] = str(work / "stamps.txt")
    limit_torch_threads(1)
    lm = build_tiny_causal_lm(work / "tiny-lm", context=4096)
    tree = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True)
    bodies = requests(work)
    folders = {"before": work / "before-configs", "after": work / "after-configs"}
    for folder in folders.values():
        folder.mkdir()
        configs(folder, lm, batch=True)
    rows = []
    try:
        for before in serve(folders["before"], folders["before"] / "server.log", ready=tuple(names), cwd=tree):
            for after in serve(folders["after"], folders["after"] / "server.log", ready=tuple(names)):
                servers = {"before": before, "after": after}
                for name in names:
                    rows.append(compare(servers, folders, name, bodies[name]))
                    print(rows[-1], flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    header = " | ".join(f"c={c} before | after" for c in CONCURRENCY)
    cpu = f"CPU ms/request at c={CONCURRENCY[-1]} before | after"
    print(f"\n| deployment | overhead p50 ms before | after | {header} | {cpu} |")
    print("|---|---|---|" + "---|" * (2 * len(CONCURRENCY) + 2))
    print("\n".join(rows))


def compare(servers: dict[str, Server], folders: dict[str, Path], name: str, body: dict[str, Any]) -> str:
    """One table row: overhead and throughput of `name`, before and after, measured in turns."""
    overhead = {}
    for arm, server in servers.items():
        served, raw, _ = overhead_ms(server, folders[arm], name, body)
        overhead[arm] = served[0] - raw[0]
    rates: dict[tuple[str, int], list[float]] = {}
    cpu_ms: dict[str, list[float]] = {}
    for concurrency in CONCURRENCY:
        for _ in range(TURNS):
            for arm, server in servers.items():
                run = asyncio.run(closed_loop(server.url, name, body, concurrency, server_pid=server.pid))
                rates.setdefault((arm, concurrency), []).append(run.rate)
                if concurrency == CONCURRENCY[-1]:
                    cpu_ms.setdefault(arm, []).append(run.cpu_ms)
    rate = {key: statistics.median(values) for key, values in rates.items()}
    cells = " | ".join(f"{rate[('before', c)]:.1f} | {rate[('after', c)]:.1f}" for c in CONCURRENCY)
    cpu = " | ".join(f"{statistics.median(cpu_ms[arm]):.2f}" for arm in ("before", "after"))
    return f"| {name} | {overhead['before']:.2f} | {overhead['after']:.2f} | {cells} | {cpu} |"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else list(BACKENDS))
