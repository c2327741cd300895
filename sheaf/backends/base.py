"""The backend contract: model code that knows nothing of HTTP or BentoML.

A `Backend` is what a deployment calls:

- `load()` reads the weights, once, before the first request.
- `predict_batch(requests, cancel)` answers a whole batch in one model call and returns
  one outcome per request, in order: its response, or the exception that request alone
  hit. Once `cancel` is set (every caller of the batch is gone or past its deadline) it
  should stop soon, raising `Cancelled`.
- `check(request)` raises what the request alone would hit before the model runs, so that
  a stream is refused or accepted before it queues for a batch.
- `stream_batch(requests, cancels, emit)` runs one model call for a batch of streams (and
  predicts that share it) and hands each event over as it is made, `emit(index, event)`:
  `ADMITTED` once the request has passed every check, then its own events, then its
  `ResultEvent`, or instead the `Exception` that request alone hit. A request whose
  `cancels[index]` is set needs nothing more (its client has gone); once every one is set,
  it should stop soon. The default emits one `ResultEvent` per request from
  `predict_batch`, so a backend streams in batches with no code of its own. A backend that
  sets `joins_running` also takes the streams that arrive while its call runs, from
  `arrivals`, at each step boundary as far as it has room, oldest first (continuous
  batching); they are emitted under the indices `arrivals` gives them. `streaming[index]`
  False marks a predict that shares the call: it needs its result only, and the backend may
  skip its other events (None: all stream).
- `stream(request, cancel)` yields one request's events as the model produces them, ending
  with a `ResultEvent`; the default runs `stream_batch` for it alone. A backend that sets
  `streams_alone` has each of its streams run `stream` on a thread of its own, sharing no
  model call. It must return soon after `cancel` is set. A stream that may wait before its
  first event yields `ADMITTED` once its request has passed every check, so that the client
  hears at once that the stream is on its way.

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
from dataclasses import dataclass
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

# How long closing a stream waits for its model work, which stops within a step.
_JOIN_TIMEOUT_S = 60.0

Emit = Callable[[int, "StreamEvent | Admitted | Exception"], None]
"""`stream_batch`'s hand-over: the request's index in the batch, and its next event."""

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

    def check(self, request: RequestT) -> None:
        """Raise what `request` alone would hit before the model runs (`InvalidRequest` ...), so that a
        stream can be refused, or accepted, before it queues for a batch. The default checks nothing."""

    def quick_check(self, request: RequestT) -> bool:
        """Whether `check(request)` takes well under a millisecond, and so runs on the event loop. Else
        it runs on a thread, a hop that costs more than a quick check under load: it waits for the
        model's thread to let go of the GIL, and streams then trickle into batches. The default: no."""
        return False

    streams_alone: bool = False
    """True: each stream runs `stream` on its own thread; its streams share no model call (a backend may
    decide per deployment, in its `__init__`)."""

    joins_running: ClassVar[bool] = False
    """True: `stream_batch` takes streams from its `arrivals` while it runs, and every batch runs it."""

    def stream_batch(
        self,
        requests: Sequence[RequestT],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,
        streaming: Sequence[bool] | None = None,
    ) -> None:
        outcomes = self.predict_batch(requests, EveryEvent(cancels))
        for index, outcome in enumerate(outcomes):
            emit(index, outcome if isinstance(outcome, Exception) else ResultEvent(response=outcome))

    def stream(self, request: RequestT, cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        """One request's events, from `stream_batch` run on a thread of its own; closing the
        generator early stops the work. Its failure is raised after the events before it."""
        stop = AnyEvent(cancel)  # also set when the generator is closed early
        thread: StreamThread[StreamEvent | Admitted] = StreamThread(f"sheaf-stream-{request.request_id}")
        failed: list[Exception] = []

        def emit(_: int, event: StreamEvent | Admitted | Exception) -> None:
            if isinstance(event, Exception):
                failed.append(event)
            elif not failed:
                thread.put(event)

        def work() -> None:
            self.stream_batch([request], [stop], emit)
            if failed:
                raise failed[0]

        thread.start(work)
        try:
            for event in thread.items():
                if not cancel.is_set():  # else nobody listens any more: just wait for the work to stop
                    yield event
        finally:
            stop.set()
            thread.join(_JOIN_TIMEOUT_S)


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

    def check(self, request: RequestT) -> None:
        self.prepare(request)

    def prepare_streams(self, requests: Sequence[RequestT], emit: Emit) -> tuple[list[PreparedT], list[int]]:
        """For `stream_batch`: the requests that prepared, with their indices; each one that did not
        gets its exception emitted as its refusal."""
        prepared: list[PreparedT] = []
        indices: list[int] = []
        for index, request in enumerate(requests):
            item = self._prepared(request)
            if isinstance(item, Exception):
                emit(index, item)
            else:
                prepared.append(item)
                indices.append(index)
        return prepared, indices

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


@dataclass(frozen=True)
class Arrival:
    """A stream joining a running call: the index it is emitted under, its request, its cancel."""

    index: int
    request: BaseRequest[Any]
    cancel: threading.Event
    streaming: bool = True  # False: a predict, which needs its result only


class Arrivals:
    """Streams that join a running `stream_batch` (a backend with `joins_running`), handed over between
    the event loop, which offers them while the call runs, and the model's thread, which takes as many
    as it has room for at each step boundary, oldest first; the others wait for rows to end. Once
    closed (the call has ended) it takes no more; what it still holds then goes back to the queue.
    """

    def __init__(self) -> None:
        self.taken: dict[int, Arrival] = {}
        """Every arrival the call took, by its index."""
        self._waiting: list[Arrival] = []
        self._open = True
        self._lock = threading.Lock()

    def offer(self, arrival: Arrival) -> bool:
        """Hand `arrival` over (its index one the call has not used); False once the call has ended."""
        with self._lock:
            if not self._open:
                return False
            self._waiting.append(arrival)
            return True

    def take(self, room: int) -> list[Arrival]:
        """Up to `room` of those that have arrived and are still wanted, oldest first; the rest wait."""
        with self._lock:
            self._waiting = [arrival for arrival in self._waiting if not arrival.cancel.is_set()]
            wanted, self._waiting = self._waiting[: max(room, 0)], self._waiting[max(room, 0) :]
        self.taken.update((arrival.index, arrival) for arrival in wanted)
        return wanted

    def close(self) -> list[int]:
        """Take no more; the indices of what was offered and never taken."""
        with self._lock:
            self._open = False
            waiting, self._waiting = self._waiting, []
        return [arrival.index for arrival in waiting]


class EveryEvent(threading.Event):
    """Reads as set once every one of `events` is: a batch's work stops when all its requests have gone.

    Only `is_set` looks at them, which is all that model code reads of a cancel signal.
    """

    def __init__(self, events: Sequence[threading.Event]) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return super().is_set() or all(event.is_set() for event in self._events)


class AnyEvent(threading.Event):
    """Reads as set once any of `events` is: a request stops on its own cancel or on its batch's."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return super().is_set() or any(event.is_set() for event in self._events)


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
