"""Fault injection for end-to-end tests: the real backends, plus a failure on cue.

A request whose `model_name` is `fail-mid-stream` raises after its second event;
`fail-in-batch` fails alone inside its batch. Every other request runs the real backend.
"""

import threading
from collections.abc import Iterator, Sequence

from sheaf.api import DiffusionRequest, StreamEvent, TextGenerationRequest, TextGenerationResponse
from sheaf.backends.flux import FluxBackend
from sheaf.backends.textgen import TextGenerationBackend


class InjectedFault(RuntimeError):
    pass


class FaultInjectingTextGeneration(TextGenerationBackend):
    def stream(self, request: TextGenerationRequest, cancel: threading.Event) -> Iterator[StreamEvent]:
        for index, event in enumerate(super().stream(request, cancel)):
            if request.model_name == "fail-mid-stream" and index == 2:
                raise InjectedFault("injected after two events")
            yield event

    def predict_batch(
        self, requests: Sequence[TextGenerationRequest], cancel: threading.Event | None = None
    ) -> list[TextGenerationResponse | Exception]:
        outcomes = super().predict_batch(requests, cancel)
        return [
            InjectedFault("injected for this request") if request.model_name == "fail-in-batch" else outcome
            for request, outcome in zip(requests, outcomes, strict=True)
        ]


class FaultInjectingFlux(FluxBackend):
    """The real FLUX backend; a `model_name` of `fail-mid-stream` raises after its second event."""

    def stream(self, request: DiffusionRequest, cancel: threading.Event) -> Iterator[StreamEvent]:
        for index, event in enumerate(super().stream(request, cancel)):
            if request.model_name == "fail-mid-stream" and index == 2:
                raise InjectedFault("injected after two events")
            yield event
