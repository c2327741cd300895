"""Fault injection for end-to-end tests: the real backends, plus a failure on cue.

A request whose `model_name` is `fail-mid-stream` fails after its second event;
`fail-in-batch` fails alone inside its batch (predicted or streamed); `slow-stream` waits a
second before each event after the first. Every other request runs the real backend. Streams
that share batches are injected in `stream_batch`, streams that run alone in `stream`.
"""

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sheaf.api import BaseRequest, BaseResponse, StreamEvent
from sheaf.backends.base import Admitted, Arrivals, Backend, Emit
from sheaf.backends.flux import FluxBackend
from sheaf.backends.forecast import ForecastBackend
from sheaf.backends.textgen import TextGenerationBackend
from sheaf.backends.whisper import WhisperBackend


class InjectedFault(RuntimeError):
    pass


class InjectsFaults(Backend[Any, Any]):
    """Put first among the bases of a real backend."""

    def stream(self, request: BaseRequest[Any], cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        index = 0
        for event in super().stream(request, cancel):
            if isinstance(event, Admitted):
                yield event
                continue
            if request.model_name == "fail-mid-stream" and index == 2:
                raise InjectedFault("injected after two events")
            if request.model_name == "slow-stream" and index > 0:
                cancel.wait(1.0)
            index += 1
            yield event

    def stream_batch(
        self,
        requests: Sequence[BaseRequest[Any]],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,
        streaming: Sequence[bool] | None = None,
    ) -> None:
        sent: defaultdict[int, int] = defaultdict(int)
        failed: set[int] = set()

        def inject(index: int, event: StreamEvent | Admitted | Exception) -> None:
            if index < len(requests):
                request, cancel = requests[index], cancels[index]
            else:  # it joined the running call
                assert arrivals is not None
                request, cancel = arrivals.taken[index].request, arrivals.taken[index].cancel
            name = request.model_name
            if index in failed:
                return
            if isinstance(event, Admitted | Exception):
                emit(index, event)
                return
            if name == "fail-mid-stream" and sent[index] == 2:
                failed.add(index)
                emit(index, InjectedFault("injected after two events"))
                return
            if name == "fail-in-batch" and event.done:
                failed.add(index)
                emit(index, InjectedFault("injected for this request"))
                return
            if name == "slow-stream" and sent[index] > 0:
                waited = time.monotonic() + 1.0
                while not cancel.is_set() and time.monotonic() < waited:
                    time.sleep(0.02)
            sent[index] += 1
            emit(index, event)

        super().stream_batch(requests, cancels, inject, arrivals, streaming)

    def predict_batch(
        self, requests: Sequence[BaseRequest[Any]], cancel: threading.Event | None = None
    ) -> list[BaseResponse | Exception]:
        outcomes = super().predict_batch(requests, cancel)  # type: ignore[safe-super]
        return [
            InjectedFault("injected for this request") if request.model_name == "fail-in-batch" else outcome
            for request, outcome in zip(requests, outcomes, strict=True)
        ]


class FaultInjectingTextGeneration(InjectsFaults, TextGenerationBackend):  # type: ignore[misc]
    pass


class FaultInjectingFlux(InjectsFaults, FluxBackend):  # type: ignore[misc]
    pass


class FaultInjectingWhisper(InjectsFaults, WhisperBackend):  # type: ignore[misc]
    pass


class FaultInjectingForecast(InjectsFaults, ForecastBackend):  # type: ignore[misc]
    pass


class GatedLoadForecast(ForecastBackend):
    """Loads only once the file named by `SHEAF_TEST_LOAD_GATE` exists: a model still loading, on cue."""

    def load(self) -> None:
        gate = Path(os.environ["SHEAF_TEST_LOAD_GATE"])
        while not gate.exists():
            time.sleep(0.1)
        super().load()
