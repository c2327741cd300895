"""What `sheaf.backends.base` does for every backend, on a backend with no model at all."""

import threading
from collections.abc import Generator, Sequence
from typing import Any

import pytest

from sheaf.api import BaseRequest, BaseResponse
from sheaf.api.events import ResultEvent
from sheaf.backends.base import Backend, BatchBackend, Cancelled, StreamThread, loaded
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest


class EchoResponse(BaseResponse):
    model_type: str = "echo"
    text: str


class EchoRequest(BaseRequest[EchoResponse]):
    response_model = EchoResponse
    model_type: str = "echo"
    text: str


class Echo(BatchBackend[EchoRequest, EchoResponse, str]):
    """Answers each request with its text in capitals; `bad` is refused, `boom` fails to prepare."""

    def __init__(self) -> None:
        super().__init__(DeploymentConfig(name="echo", model=ModelSource(path="unused")))
        self.batches: list[list[str]] = []  # what each predict call got
        self.cancels: list[threading.Event] = []
        self.extra_outcomes = 0  # predict answers this many outcomes too many (a broken backend)

    def load(self) -> None:
        pass

    def prepare(self, request: EchoRequest) -> str:
        if request.text == "bad":
            raise InvalidRequest("text", "is bad")
        if request.text == "boom":
            raise ValueError("preparing failed")
        return request.text.upper()

    def predict(self, prepared: Sequence[str], cancel: threading.Event) -> list[EchoResponse | Exception]:
        self.batches.append(list(prepared))
        self.cancels.append(cancel)
        if cancel.is_set():
            raise Cancelled("stopped before the model ran")
        answers = [*prepared, *["extra"] * self.extra_outcomes]
        return [EchoResponse(request_id="", model_name="", text=text) for text in answers]


def requests(*texts: str) -> list[EchoRequest]:
    return [EchoRequest(text=text) for text in texts]


def texts(outcomes: Sequence[BaseResponse | Exception]) -> list[str]:
    return [o.text if isinstance(o, EchoResponse) else type(o).__name__ for o in outcomes]


def test_a_request_that_fails_to_prepare_is_its_own_outcome_in_its_place() -> None:
    backend = Echo()
    outcomes = backend.predict_batch(requests("a", "bad", "b", "boom", "c"))
    assert texts(outcomes) == ["A", "InvalidRequest", "B", "ValueError", "C"]
    assert backend.batches == [["A", "B", "C"]]  # the model saw only the prepared ones, in order


def test_the_model_does_not_run_when_no_request_prepared() -> None:
    backend = Echo()
    assert texts(backend.predict_batch(requests("bad", "boom"))) == ["InvalidRequest", "ValueError"]
    assert texts(backend.predict_batch([])) == []
    assert backend.batches == []


def test_predict_always_gets_a_real_cancel() -> None:
    backend = Echo()
    backend.predict_batch(requests("a"))
    given = threading.Event()
    backend.predict_batch(requests("a"), given)
    none_given, passed = backend.cancels
    assert isinstance(none_given, threading.Event) and not none_given.is_set()
    assert passed is given


def test_cancelled_comes_out_of_predict_batch() -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="before the model ran"):
        Echo().predict_batch(requests("a", "bad"), cancel)


def test_a_predict_with_the_wrong_number_of_outcomes_is_an_error() -> None:
    backend = Echo()
    backend.extra_outcomes = 1
    with pytest.raises(RuntimeError, match="gave 3 outcomes for 2 requests"):
        backend.predict_batch(requests("a", "bad", "b"))


class Wrapped(Backend[Any, Any]):
    """A wrapper put first among the bases of a real backend, as the tests' fault injection is."""

    def predict_batch(
        self, requests: Sequence[BaseRequest[Any]], cancel: threading.Event | None = None
    ) -> list[BaseResponse | Exception]:
        outcomes = super().predict_batch(requests, cancel)  # type: ignore[safe-super]
        wrapped = [request.model_name == "wrap" for request in requests]
        return [RuntimeError("wrapped") if wrap else o for wrap, o in zip(wrapped, outcomes, strict=True)]


class WrappedEcho(Wrapped, Echo):  # type: ignore[misc]
    pass


def test_a_wrapper_that_calls_super_gets_every_outcome() -> None:
    batch = [*requests("a", "bad"), EchoRequest(text="b", model_name="wrap")]
    assert texts(WrappedEcho().predict_batch(batch)) == ["A", "InvalidRequest", "RuntimeError"]


def test_the_default_stream_answers_from_predict_batch() -> None:
    backend = Echo()
    (event,) = list(backend.stream(EchoRequest(text="a"), threading.Event()))
    assert isinstance(event, ResultEvent) and event.response.text == "A"
    with pytest.raises(InvalidRequest, match="is bad"):
        list(backend.stream(EchoRequest(text="bad"), threading.Event()))


def test_loaded_says_what_is_not_loaded_yet() -> None:
    model = object()
    assert loaded(model) is model
    with pytest.raises(RuntimeError, match=r"^the model is not loaded: call load\(\) first$"):
        loaded(None)
    with pytest.raises(RuntimeError, match=r"^the tokenizer is not loaded"):
        loaded(None, "the tokenizer")


def test_a_stream_thread_hands_over_its_items_then_its_failure() -> None:
    thread: StreamThread[str] = StreamThread("sheaf-test-stream")
    ran_on: list[str] = []

    def work() -> None:
        ran_on.append(threading.current_thread().name)
        thread.put("one")
        thread.put("two")
        raise ValueError("the work failed")

    thread.start(work)
    got: list[str] = []
    with pytest.raises(ValueError, match="the work failed"):
        for item in thread.items():
            got.append(item)
    thread.join(10)
    assert got == ["one", "two"]
    assert isinstance(thread.failure, ValueError)
    assert ran_on == ["sheaf-test-stream"]  # not the consumer's thread


def test_a_stream_closed_early_can_stop_its_thread() -> None:
    stop = threading.Event()
    thread: StreamThread[int] = StreamThread("sheaf-test-stream")

    def work() -> None:
        count = 0
        while not stop.is_set():
            thread.put(count)
            count += 1
            stop.wait(0.001)

    def stream() -> Generator[int]:
        thread.start(work)
        try:
            yield from thread.items()
        finally:
            stop.set()
            thread.join(10)

    events = stream()
    assert next(events) == 0
    events.close()  # as a client that goes away does
    assert stop.is_set() and thread.failure is None
    thread.join(0)
    assert not any(t.name == "sheaf-test-stream" and t.is_alive() for t in threading.enumerate())
