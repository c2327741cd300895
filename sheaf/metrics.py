"""sheaf's own Prometheus series, served on BentoML's `/metrics` beside its request metrics.

Under `bentoml serve` every worker writes its series into its server's multiprocess folder, so
the entry service's `/metrics` shows every deployment's, labelled by `deployment`. That folder
is the server's own (`own_multiprocess_dir`): BentoML's default is one folder for every server
on the machine, which each start empties.
"""

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import Counter, Histogram

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "sheaf-metrics-"  # then the server's pid


@functools.cache  # one folder a process, however often asked
def own_multiprocess_dir() -> str:
    """The Prometheus multiprocess folder of this server: a new one, unless this is a worker.

    BentoML's `serve_http` empties and uses `BentoMLContainer.prometheus_multiproc_dir`
    (`$BENTOML_HOME/prometheus_multiproc_dir`) after it has imported the service, then hands it
    to its workers as `PROMETHEUS_MULTIPROC_DIR`. Called while the service module is imported,
    this sets that folder first: in the server process a new one under the temp dir, named by
    its pid and removed at exit (or, if the server was killed, at the next server's start). A
    worker (BentoML has given it a `worker_index`) keeps the folder its server handed down. An
    inherited `PROMETHEUS_MULTIPROC_DIR` means nothing here, as it means nothing to BentoML's
    server: Feast, for one, sets it in any process that imports it, whose children would then
    share one folder again.
    """
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    if bentoml.server_context.worker_index is not None:
        return os.environ.get(MULTIPROCESS_DIR_ENV, "")
    remove_stale_folders(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(folder)
    return folder


def remove_stale_folders(root: str) -> None:
    """Remove the folders under `root` of servers that are gone without removing theirs (killed)."""
    for folder in Path(root).glob(f"{FOLDER_PREFIX}*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


BATCH_SIZE = Histogram(
    "sheaf_batch_size",
    "Requests per model call, as adaptive batching formed it; route=stream when streams shared it.",
    ["deployment", "route"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
STREAM_EVENTS = Counter("sheaf_stream_events", "Stream events sent, by event type.", ["deployment", "type"])
STREAMS_CANCELLED = Counter(
    "sheaf_streams_cancelled", "Streams whose client left before the final event.", ["deployment"]
)
STREAM_ERRORS = Counter(
    "sheaf_stream_errors_after_start", "Streams ended by an error event after they began.", ["deployment"]
)
ADAPTER_SWAPS = Counter("sheaf_adapter_swaps", "Changes of the active LoRA adapter selection.", ["deployment"])
ADAPTER_LOCK_WAIT = Histogram(
    "sheaf_adapter_lock_wait_seconds",
    "Time a pipeline run waited for the LoRA adapter lock.",
    ["deployment"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FEATURE_LOOKUP = Histogram(
    "sheaf_feature_lookup_seconds",
    "Time to resolve one request's or one batch's feature_refs in the feature store.",
    ["deployment"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
