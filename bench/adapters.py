"""`python -m bench.adapters`: FLUX throughput with many LoRA selections at once (in `make bench`).

At concurrency 8, on the same tiny FLUX with two tiny adapters, each served for real: 8 clients each
with its own adapter selection, and 8 clients all with one selection (the ceiling that batching
reaches on this machine); with mixed adapter batches on (one pipeline call takes every selection)
and off (one call per selection, an adapter swap between them); with `batch_invariant` on (the
default: each sample's matrix products alone, so batching gains less on CPU) and off. Closed loop
through the entry service; both modes served at once and measured in turns, each arm the median of
`TURNS` runs. Writes `bench/results/<date>-adapters.md`.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench.load import predicts
from bench.run import machine, write_results
from sheaf.backends.base import limit_torch_threads
from tests.conftest import serve

CONCURRENCY = 8
TURNS = 5
SECONDS = 4.0  # per run
SELECTIONS: list[dict[str, Any]] = [
    {"adapters": []},
    {"adapters": ["a"]},
    {"adapters": ["b"]},
    {"adapters": ["a", "b"]},
    {"adapters": ["a"], "adapter_weights": [0.5]},
    {"adapters": ["b"], "adapter_weights": [0.5]},
    {"adapters": ["a", "b"], "adapter_weights": [0.5, 1.0]},
    {"adapters": ["a", "b"], "adapter_weights": [1.0, 0.5]},
]
BODY = {"model_type": "diffusion", "prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 4}


def config(folder: Path, mixed: bool, batch_invariant: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "flux.yaml").write_text(
        'name: flux\nmodel: {build: "tiny.models:build_tiny_flux"}\nthreads: 1\n'
        f"batching: {{max_batch_size: {CONCURRENCY}}}\nlimits: {{max_pending: 4096, max_streams: 1024}}\n"
        "options:\n  adapters:\n"
        '    - {name: a, source: {build: "tiny.models:build_tiny_flux_lora_a"}}\n'
        '    - {name: b, source: {build: "tiny.models:build_tiny_flux_lora_b"}}\n'
        f"  mixed_adapter_batches: {str(mixed).lower()}\n  batch_invariant: {str(batch_invariant).lower()}\n"
    )
    return folder


async def rate(url: str, bodies: list[dict[str, Any]], seconds: float) -> float:
    """Requests per second in one run of `seconds`: one client per body, each sending its body again as
    soon as it is answered (after a warm-up of a second)."""
    async with AsyncExitStack() as stack:
        posts = [
            await stack.enter_async_context(predicts(url, "flux", body, connections=1, timeout_s=300))
            for body in bodies
        ]

        async def client(post: Callable[[], Awaitable[int]], until: float) -> int:
            done = 0
            while time.perf_counter() < until:
                if await post() != 200:
                    raise RuntimeError("a flux predict failed under load")
                done += 1
            return done

        await asyncio.gather(*(client(post, time.perf_counter() + 1.0) for post in posts))  # warm-up
        started = time.perf_counter()
        done = sum(await asyncio.gather(*(client(post, started + seconds) for post in posts)))
        return done / (time.perf_counter() - started)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sheaf-bench-adapters-"))
    os.environ["SHEAF_CACHE_DIR"] = str(work / "cache")
    limit_torch_threads(1)
    distinct = [{**BODY, **selection} for selection in SELECTIONS]
    one = [{**BODY, **SELECTIONS[1]}] * CONCURRENCY
    rows: list[str] = []
    for batch_invariant in (True, False):
        folders = {
            mode: config(work / f"{mode}-invariant-{batch_invariant}", mode == "mixed", batch_invariant)
            for mode in ("mixed", "grouped")
        }
        runs: dict[str, list[float]] = {}
        # Both served at once and measured in turns (A B A B), so that the machine's drift moves every arm alike.
        for mixed in serve(folders["mixed"], folders["mixed"] / "server.log", ready=("flux",)):
            for grouped in serve(folders["grouped"], folders["grouped"] / "server.log", ready=("flux",)):
                for _ in range(TURNS):
                    for mode, server in (("mixed", mixed), ("grouped", grouped)):
                        for label, bodies in (("one selection", one), ("8 selections", distinct)):
                            arm = f"{label}, {mode}"
                            runs.setdefault(arm, []).append(asyncio.run(rate(server.url, bodies, SECONDS)))
                            print(f"batch_invariant={batch_invariant} {arm}: {runs[arm][-1]:.2f} req/s", flush=True)
        medians = {arm: statistics.median(values) for arm, values in runs.items()}
        ceiling = medians["one selection, mixed"]
        rows += [
            f"| {batch_invariant} | {arm} | {value:.2f} | {value / ceiling:.0%} |" for arm, value in medians.items()
        ]
    lines = [
        f"# FLUX with many adapter selections, {datetime.date.today().isoformat()}",
        "",
        f"{machine()}. Tiny FLUX, two tiny LoRA adapters, 64x64, 4 steps, {CONCURRENCY} clients (closed loop "
        f"through the entry service, median of {TURNS} runs of {SECONDS:g} s taken in turns), "
        f"`max_batch_size: {CONCURRENCY}`. "
        "Mixed: `mixed_adapter_batches: true` (the default), every selection in one call; grouped: false, "
        "one call per selection. The last column sets each arm against one selection with mixed batches on.",
        "",
        "| batch_invariant | arm | req/s | of one selection's (mixed) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    write_results("\n".join(lines), "-adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
