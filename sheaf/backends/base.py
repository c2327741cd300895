"""The backend contract: model code that knows nothing of HTTP or BentoML.

A `Backend` is what a deployment calls:

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

A model backend subclasses `BatchBackend`, which owns the plumbing of `predict_batch`, and
overrides its hooks: `prepare(request)` checks one request and turns it into what the model
takes, and `predict(prepared, cancel)` runs the model on the prepared ones. `loaded` guards
what `load()` sets, and `StreamThread` runs a stream's model work beside its generator.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
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
PreparedT = TypeVar("PreparedT")
ItemT = TypeVar("ItemT")
LoadedT = TypeVar("LoadedT")


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


class BatchBackend(Backend[RequestT, ResponseT], Generic[RequestT, ResponseT, PreparedT]):
    """A backend whose `predict_batch` prepares each request alone, then predicts the prepared ones together.

    A request that fails to prepare (an `InvalidRequest`, or whatever else it alone hit) gets that
    exception as its outcome and never reaches the model; the rest of its batch goes on.

    (`predict_batch` is implemented here rather than in `Backend`, whose abstract one is the contract
    that wrappers of a real backend, such as the test suite's fault injection, are typed against.)
    """

    @abstractmethod
    def prepare(self, request: RequestT) -> PreparedT:
        """What the model takes for `request`; raises (`InvalidRequest` ...) when this deployment cannot take it.

        `stream` can call it too: there its exception is the stream's refusal.
        """

    @abstractmethod
    def predict(self, prepared: Sequence[PreparedT], cancel: threading.Event) -> list[ResponseT | Exception]:
        """One outcome per prepared request, in order; raises `Cancelled` soon after `cancel` is set.

        Called with at least one prepared request, and with a real `cancel` (never set when the caller gave none).
        """

    def predict_batch(
        self, requests: Sequence[RequestT], cancel: threading.Event | None = None
    ) -> list[ResponseT | Exception]:
        cancel = cancel or threading.Event()  # none given: never set
        prepared = [self._prepared(request) for request in requests]
        valid = [item for item in prepared if not isinstance(item, Exception)]
        results = self.predict(valid, cancel) if valid else []
        if len(results) != len(valid):
            raise RuntimeError(f"{type(self).__name__}.predict gave {len(results)} outcomes for {len(valid)} requests")
        answers = iter(results)
        return [item if isinstance(item, Exception) else next(answers) for item in prepared]

    def _prepared(self, request: RequestT) -> PreparedT | Exception:
        try:
            return self.prepare(request)
        except Exception as exc:  # InvalidRequest, or whatever else this one request hit: its own outcome
            return exc


class StreamThread(Generic[ItemT]):
    """A stream's model work on a thread of its own, handing its items to the stream's generator as it makes them.

    The generator yields each item as soon as it is made and can stop the work when it is closed early.
    The work's failure is not lost in its thread: `items()` raises it in the generator's, after the items
    made before it. Items are never None (None marks the end of the work).
    """

    def __init__(self, name: str) -> None:
        self.failure: BaseException | None = None
        self._name = name
        self._items: queue.Queue[ItemT | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, work: Callable[[], None]) -> None:
        """Run `work` on the thread; it hands each item over with `put`."""
        self._thread = threading.Thread(target=self._run, args=(work,), name=self._name, daemon=True)
        self._thread.start()

    def put(self, item: ItemT) -> None:
        self._items.put(item)

    def items(self) -> Iterator[ItemT]:
        """Each item as it comes until the work ends; then the work's failure, if it failed."""
        while (item := self._items.get()) is not None:
            yield item
        if self.failure is not None:
            raise self.failure

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # not swallowed: `items()` re-raises it in the generator's thread
            self.failure = exc
        finally:
            self._items.put(None)


def loaded(value: LoadedT | None, what: str = "the model") -> LoadedT:
    """`value`, which `load()` sets; a RuntimeError naming `what` when it has not run yet."""
    if value is None:
        raise RuntimeError(f"{what} is not loaded: call load() first")
    return value


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
