"""The backend contract: model code that knows nothing of HTTP or BentoML.

A backend overrides three hooks:

- `load()` reads the weights, once, before the first request.
- `predict_batch(requests, cancel)` answers a whole batch in one model call and returns
  one outcome per request, in order: its response, or the exception that request alone
  hit. Once `cancel` is set (every caller of the batch is gone or past its deadline) it
  should stop soon, raising `Cancelled`.
- `stream(request, cancel)` (optional) yields events as the model produces them and
  ends with a `ResultEvent`. It must return soon after `cancel` is set. The default
  yields a single `ResultEvent` built from `predict_batch`. A stream that may wait before
  its first event (a lock, a long first step) yields `ADMITTED` as soon as its request has
  passed every check, so that the client hears at once that the stream is on its way.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from sheaf.api.base import BaseRequest, BaseResponse
from sheaf.api.events import ResultEvent, StreamEvent
from sheaf.config import DeploymentConfig

if TYPE_CHECKING:
    import torch


class Cancelled(Exception):
    """The work stopped because `cancel` was set: its callers are gone or past their deadline."""


class Admitted:
    """What `stream` yields once its request has passed every check, before the model runs.

    Up to here a refusal is a plain HTTP error (422 ...); after it the stream is accepted
    (200), and a failure is an `error` event.
    """


ADMITTED = Admitted()

RequestT = TypeVar("RequestT", bound=BaseRequest[Any])
ResponseT = TypeVar("ResponseT", bound=BaseResponse)


class Backend(ABC, Generic[RequestT, ResponseT]):
    options_model: ClassVar[type[BaseModel] | None] = None
    """Validates `options:` of the deployment config, when the backend takes any."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config

    def options(self) -> Any:
        model = self.options_model
        return model.model_validate(self.config.options) if model else self.config.options

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def predict_batch(
        self, requests: Sequence[RequestT], cancel: threading.Event | None = None
    ) -> list[ResponseT | Exception]: ...

    def stream(self, request: RequestT, cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        (outcome,) = self.predict_batch([request], cancel)
        if isinstance(outcome, Exception):
            raise outcome
        yield ResultEvent(response=outcome)


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a `time.perf_counter()` reading), for response metadata."""
    return round((time.perf_counter() - started) * 1000, 1)


def torch_device(setting: str) -> torch.device:
    """The config's `device` for torch: "auto" is CUDA when there is one."""
    import torch  # here, not at the top: the service imports this module and never loads torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def limit_torch_threads(threads: int | None) -> None:
    """Size torch's intra-op pool for the whole process (None leaves torch's default)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
