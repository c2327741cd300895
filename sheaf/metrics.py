"""sheaf's own Prometheus series, served on BentoML's `/metrics` beside its request metrics.

Under `bentoml serve` every worker writes its series into BentoML's shared multiprocess
folder, so the entry service's `/metrics` shows every deployment's, labelled by `deployment`.
"""

from prometheus_client import Counter, Histogram

BATCH_SIZE = Histogram(
    "sheaf_batch_size",
    "Requests per predict batch, as adaptive batching formed it.",
    ["deployment"],
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
