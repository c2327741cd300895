"""The real backends, with the moments that the stream benchmarks need written down.

Each stream appends `request_id kind index monotonic_s` lines to the file named by
`SHEAF_BENCH_STAMPS`: `emit` as the backend hands over an event, `stop` once the backend's
own cleanup has returned (its model work has ended; for streams that share a batch, the
batch's). `time.monotonic` is one clock for every
process on the machine, so the bench client can set its own readings against them.
"""

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from sheaf.api import BaseRequest, StreamEvent
from sheaf.backends.base import Admitted, Arrivals, Backend, Emit
from sheaf.backends.flux import FluxBackend
from sheaf.backends.forecast import ForecastBackend
from sheaf.backends.textgen import TextGenerationBackend
from sheaf.backends.whisper import WhisperBackend

STAMPS_ENV = "SHEAF_BENCH_STAMPS"


_pending: list[str] = []
_writing = threading.Lock()


def stamp(request_id: str, kind: str, index: int) -> None:
    """Note a moment; the notes reach the file with the next `stop`, which is what readers wait for
    (a file write per event would cost streams more than the events do)."""
    _pending.append(f"{request_id} {kind} {index} {time.monotonic():.6f}\n")
    if kind == "stop":
        with _writing, open(os.environ[STAMPS_ENV], "a") as stamps:
            lines = _pending[:]
            del _pending[: len(lines)]
            stamps.write("".join(lines))


class Stamped(Backend[Any, Any]):
    """Put first among the bases of a real backend."""

    def stream(self, request: BaseRequest[Any], cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        events = super().stream(request, cancel)
        index = 0
        try:
            for event in events:
                if not isinstance(event, Admitted):
                    stamp(request.request_id, "emit", index)
                    index += 1
                yield event
        finally:
            getattr(events, "close", lambda: None)()  # returns once the backend has stopped its model work
            stamp(request.request_id, "stop", -1)

    def stream_batch(
        self,
        requests: Sequence[BaseRequest[Any]],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,
        streaming: Sequence[bool] | None = None,
    ) -> None:
        sent: defaultdict[int, int] = defaultdict(int)
        joined = arrivals.taken if arrivals is not None else {}

        def stamped(index: int, event: StreamEvent | Admitted | Exception) -> None:
            if not isinstance(event, Admitted | Exception):
                request = requests[index] if index < len(requests) else joined[index].request
                stamp(request.request_id, "emit", sent[index])
                sent[index] += 1
            emit(index, event)

        try:
            super().stream_batch(requests, cancels, stamped, arrivals, streaming)
        finally:  # the model work of the whole batch has ended
            for request in [*requests, *(arrival.request for arrival in joined.values())]:
                stamp(request.request_id, "stop", -1)


class TextGeneration(Stamped, TextGenerationBackend):
    pass


class Flux(Stamped, FluxBackend):
    pass


class Whisper(Stamped, WhisperBackend):
    pass


class Forecast(Stamped, ForecastBackend):
    pass
