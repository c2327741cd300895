"""The FLUX backend in process, on a tiny random FluxPipeline with two tiny LoRA adapters."""

import base64
import io
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from sheaf.api.diffusion import DiffusionRequest, DiffusionResponse
from sheaf.api.events import ProgressEvent, ResultEvent
from sheaf.backends.base import ADMITTED, Admitted, Cancelled
from sheaf.backends.flux import FluxBackend
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest
from sheaf.lora import Selection
from tests.backends.cancelling import cancel_on_cue
from tests.backends.streams import events
from tiny.models import build_tiny_flux, build_tiny_flux_lora_a, build_tiny_flux_lora_b

PREVIEW_MAX_SIDE = 32
MAX_PIXELS = 64 * 128
SELECTIONS: dict[str, dict[str, Any]] = {
    "none": {"adapters": []},
    "a": {"adapters": ["a"]},
    "b": {"adapters": ["b"]},
    "a+b": {"adapters": ["a", "b"], "adapter_weights": [0.7, 0.3]},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-flux")
    return {
        "pipeline": build_tiny_flux(root / "pipeline"),
        "a": build_tiny_flux_lora_a(root / "lora-a"),
        "b": build_tiny_flux_lora_b(root / "lora-b"),
    }


def make_backend(weights: dict[str, Path], **options: Any) -> FluxBackend:
    config = DeploymentConfig(
        name="flux",
        model=ModelSource(path=str(weights["pipeline"])),
        options={
            "adapters": [
                {"name": "a", "source": {"path": str(weights["a"])}},
                {"name": "b", "source": {"path": str(weights["b"])}},
            ],
            "preview_max_side": PREVIEW_MAX_SIDE,
            "max_pixels": MAX_PIXELS,
            **options,
        },
    )
    backend = FluxBackend(config)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def backend(weights: dict[str, Path]) -> FluxBackend:
    return make_backend(weights)  # mixed adapter batches, the default


@pytest.fixture(scope="module")
def grouped(weights: dict[str, Path]) -> FluxBackend:
    """The fallback: one pipeline call per adapter selection, each under the adapter lock."""
    return make_backend(weights, mixed_adapter_batches=False)


@pytest.fixture(scope="module")
def default_a_backend(weights: dict[str, Path]) -> FluxBackend:
    return make_backend(weights, default_adapters=["a"])


def request(**fields: Any) -> DiffusionRequest:
    defaults: dict[str, Any] = {
        "prompt": "a red house by the sea",
        "height": 32,
        "width": 32,
        "num_inference_steps": 4,
        "seed": 7,
        "adapters": [],
    }
    return DiffusionRequest(**{**defaults, **fields})


def predict(backend: FluxBackend, req: DiffusionRequest) -> DiffusionResponse:
    (outcome,) = backend.predict_batch([req])
    assert isinstance(outcome, DiffusionResponse), outcome
    return outcome


def stream(
    backend: FluxBackend, req: DiffusionRequest, cancel: threading.Event | None = None
) -> tuple[list[ProgressEvent], DiffusionResponse]:
    *before, last = events(backend.stream(req, cancel or threading.Event()))
    progress = [event for event in before if isinstance(event, ProgressEvent)]
    assert len(progress) == len(before)
    assert isinstance(last, ResultEvent) and isinstance(last.response, DiffusionResponse)
    return progress, last.response


def image(b64: str) -> Image.Image:
    decoded = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert decoded.format == "PNG"
    return decoded


def pixels(response: DiffusionResponse) -> bytes:
    """The decoded pixels: equal pixels, not just equal files, are what "the same image" means."""
    decoded = image(response.image_b64)
    assert decoded.size == (response.width, response.height)
    return decoded.tobytes()


def count_denoising_steps(
    monkeypatch: pytest.MonkeyPatch, backend: FluxBackend, before: Callable[[int, Any], None] = lambda n, kw: None
) -> list[int]:
    """Count transformer calls (one per denoising step), running `before(call_number, kwargs)` ahead of each."""
    transformer = backend.pipe.transformer
    forward = transformer.forward
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        before(calls[0], kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", counted)
    return calls


def assert_lock_free(backend: FluxBackend) -> None:
    """A next request runs at once: nobody holds or waits for the adapter lock."""
    done = threading.Event()

    def run() -> None:
        predict(backend, request(seed=1))
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)  # a guard against a hang, not a timing assertion: it takes milliseconds
    assert done.is_set(), "the adapter lock is still held"
    assert backend.adapters.waiting == 0


# -- streaming ---------------------------------------------------------------------------------


def test_stream_reports_every_step_then_the_image(backend: FluxBackend) -> None:
    progress, response = stream(backend, request(height=32, width=64, num_inference_steps=5, preview_every=2))
    assert [event.step for event in progress] == [1, 2, 3, 4, 5]
    assert {event.total_steps for event in progress} == {5}
    assert [event.preview_b64 is not None for event in progress] == [False, True, False, True, False]
    for event in progress:
        if event.preview_b64 is not None:
            preview = image(event.preview_b64)
            assert max(preview.size) <= PREVIEW_MAX_SIDE
            assert preview.size == (32, 16)  # the requested shape, fitted
    assert image(response.image_b64).size == (64, 32)
    assert (response.height, response.width, response.seed) == (32, 64, 7)
    assert response.metadata["batch_size"] == 1
    assert response.metadata["adapters"] == {}


def test_sizes_that_are_not_multiples_of_16_come_back_exact(backend: FluxBackend) -> None:
    response = predict(backend, request(height=24, width=40))
    assert image(response.image_b64).size == (40, 24)


def test_server_picks_a_seed_that_reproduces_the_image(backend: FluxBackend) -> None:
    first = predict(backend, request(seed=None))
    assert 0 <= first.seed < 2**63
    assert pixels(predict(backend, request(seed=first.seed))) == pixels(first)
    assert predict(backend, request(seed=None)).seed != first.seed


# -- the same seed gives the same image ----------------------------------------------------------


def test_same_seed_same_image_alone_in_a_mixed_batch_and_streamed(grouped: FluxBackend) -> None:
    backend = grouped
    plain = request(height=24, width=40, seed=11)
    adapted = request(seed=12, **SELECTIONS["a+b"])
    alone = {name: predict(backend, req) for name, req in (("plain", plain), ("adapted", adapted))}

    outcomes = backend.predict_batch(
        [
            request(height=24, width=40, seed=99),  # shares plain's pipeline call
            plain,
            request(seed=11, num_inference_steps=3),  # other steps
            request(height=48, width=32, seed=11, adapters=["b"]),  # other size and adapters
            adapted,
            request(adapters=["missing"]),  # refused alone
            request(seed=13, **SELECTIONS["a+b"]),  # shares adapted's call
            request(height=24, width=40, seed=14, adapters=["a"]),  # plain's shape, other adapters
        ]
    )
    assert isinstance(outcomes[5], InvalidRequest)
    responses = [outcome for outcome in outcomes if isinstance(outcome, DiffusionResponse)]
    assert len(responses) == 7
    for response, name in ((responses[1], "plain"), (responses[4], "adapted")):
        assert pixels(response) == pixels(alone[name])
        assert response.image_b64 == alone[name].image_b64  # the very same PNG file
    assert [response.metadata["batch_size"] for response in responses] == [2, 2, 1, 1, 2, 2, 1]
    assert responses[4].metadata["adapters"] == {"a": 0.7, "b": 0.3}
    # Other seeds and settings in the same batch gave other images.
    assert len({pixels(response) for response in responses}) == 7

    for req, name in ((plain, "plain"), (adapted, "adapted")):
        _, streamed = stream(backend, req)
        assert pixels(streamed) == pixels(alone[name])
        assert streamed.image_b64 == alone[name].image_b64


# -- adapters ----------------------------------------------------------------------------------


def reference_images(backend: FluxBackend) -> dict[str, bytes]:
    return {name: pixels(predict(backend, request(**fields))) for name, fields in SELECTIONS.items()}


def test_each_adapter_selection_gives_its_own_image(backend: FluxBackend) -> None:
    images = reference_images(backend)
    assert len(set(images.values())) == len(SELECTIONS)


@pytest.mark.parametrize("mode", ["mixed", "grouped"])
def test_no_adapter_bleed_between_concurrent_predicts_and_streams(
    mode: str, backend: FluxBackend, grouped: FluxBackend
) -> None:
    backend = backend if mode == "mixed" else grouped
    expected = reference_images(backend)
    swaps_before = backend.adapters.swaps
    results: list[tuple[str, str, bytes]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def run(number: int) -> None:
        name = list(SELECTIONS)[number % len(SELECTIONS)]
        req = request(**SELECTIONS[name])
        try:
            start.wait()
            if number == 0:  # one batch with every selection in it
                outcomes = backend.predict_batch([request(**fields) for fields in SELECTIONS.values()])
                for each, outcome in zip(SELECTIONS, outcomes, strict=True):
                    assert isinstance(outcome, DiffusionResponse)
                    results.append((each, "batched predict", pixels(outcome)))
            elif number % 2:
                results.append((name, "stream", pixels(stream(backend, req)[1])))
            else:
                results.append((name, "predict", pixels(predict(backend, req))))
        except BaseException as exc:  # reported below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 15 + len(SELECTIONS)
    for name, kind, got in results:
        assert got == expected[name], f"{kind} with adapters {name} gave another selection's image"
    if mode == "grouped":
        assert backend.adapters.swaps > swaps_before  # the selections really did alternate
    else:
        assert backend.adapters.swaps == swaps_before  # every selection at once, the pipeline's own never changed


def active(backend: FluxBackend) -> Selection | None:
    return backend.adapters.active


def test_empty_adapters_never_inherit_the_last_selection(grouped: FluxBackend) -> None:
    backend = grouped
    without = pixels(predict(backend, request(adapters=[])))
    predict(backend, request(adapters=["a"]))
    assert active(backend) == (("a", 1.0),)
    assert pixels(predict(backend, request(adapters=[]))) == without
    assert active(backend) == ()
    predict(backend, request(adapters=["b"]))
    _, streamed = stream(backend, request(adapters=[]))
    assert pixels(streamed) == without
    # Null on a deployment without default adapters means none as well.
    assert pixels(predict(backend, request(adapters=None))) == without


def test_default_adapters_apply_when_adapters_is_null(backend: FluxBackend, default_a_backend: FluxBackend) -> None:
    defaulted = predict(default_a_backend, request(adapters=None))
    assert defaulted.metadata["adapters"] == {"a": 1.0}
    assert pixels(defaulted) == pixels(predict(backend, request(adapters=["a"])))
    # An explicit empty list still turns the defaults off.
    assert pixels(predict(default_a_backend, request(adapters=[]))) == pixels(predict(backend, request(adapters=[])))


def test_every_selection_in_one_mixed_batch_is_its_image_alone(
    backend: FluxBackend, grouped: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = reference_images(backend)
    assert len(set(alone.values())) == len(SELECTIONS)  # each selection draws its own image
    assert alone == reference_images(grouped)  # the same pixels as with the pipeline's own LoRA path
    steps = count_denoising_steps(monkeypatch, backend)
    swaps = backend.adapters.swaps
    outcomes = backend.predict_batch([request(**fields) for fields in SELECTIONS.values()])
    assert steps[0] == 4  # one denoising loop of 4 steps for the four selections
    assert backend.adapters.swaps == swaps
    for name, outcome in zip(SELECTIONS, outcomes, strict=True):
        assert isinstance(outcome, DiffusionResponse)
        assert pixels(outcome) == alone[name], f"{name} in a mixed batch is not its image alone"
        assert outcome.metadata["batch_size"] == len(SELECTIONS)
        assert outcome.metadata["adapters"] == dict(backend.selection(request(**SELECTIONS[name])))


def test_streams_with_mixed_selections_share_one_loop_each_with_its_own_image(
    backend: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = reference_images(backend)
    requests = [request(preview_every=2, **fields) for fields in SELECTIONS.values()]
    got: dict[int, list[Any]] = {index: [] for index in range(len(requests))}
    steps = count_denoising_steps(monkeypatch, backend)
    backend.stream_batch(requests, [threading.Event() for _ in requests], lambda index, event: got[index].append(event))
    assert steps[0] == 4
    for index, name in enumerate(SELECTIONS):
        *progress, last = [event for event in got[index] if not isinstance(event, Admitted)]
        assert [event.step for event in progress] == [1, 2, 3, 4]
        assert [event.preview_b64 is not None for event in progress] == [False, True, False, True]
        assert isinstance(last, ResultEvent) and pixels(last.response) == alone[name]


def test_selection_is_canonical(backend: FluxBackend) -> None:
    assert backend.selection(request(adapters=["b", "a"], adapter_weights=[0.3, 0.7])) == (("a", 0.7), ("b", 0.3))
    assert backend.selection(request(adapters=["b"])) == (("b", 1.0),)
    assert backend.selection(request(adapters=[])) == ()
    flipped = predict(backend, request(adapters=["b", "a"], adapter_weights=[0.3, 0.7]))
    assert pixels(flipped) == pixels(predict(backend, request(**SELECTIONS["a+b"])))


def test_default_adapters_must_be_configured(weights: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="zz"):
        FluxBackend(
            DeploymentConfig(
                name="flux",
                model=ModelSource(path=str(weights["pipeline"])),
                options={
                    "adapters": [{"name": "a", "source": {"path": str(weights["a"])}}],
                    "default_adapters": ["zz"],
                },
            )
        )


# -- refusals ----------------------------------------------------------------------------------


def mismatched_weights() -> DiffusionRequest:
    req = request(adapters=["a"])
    req.adapter_weights = [0.5, 0.5]  # the contract refuses this at parsing; the backend checks again
    return req


@pytest.mark.parametrize(
    ("make", "field", "message"),
    [
        (lambda: request(adapters=["a", "zz"]), "adapters", "unknown adapter 'zz'; this deployment has: a, b"),
        (mismatched_weights, "adapter_weights", "gives 2 weights for 1 adapters"),
        (lambda: request(height=128, width=128), "height", "16384 pixels; this deployment's limit is 8192"),
    ],
)
def test_invalid_requests_fail_before_any_event(
    backend: FluxBackend, make: Callable[[], DiffusionRequest], field: str, message: str
) -> None:
    assert_refused_before_any_event(backend, make, field, message)


def assert_refused_before_any_event(
    backend: FluxBackend, make: Callable[[], DiffusionRequest], field: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        next(backend.stream(make(), threading.Event()))
    assert raised.value.field == field
    assert message in raised.value.message

    invalid, valid = backend.predict_batch([make(), request()])
    assert isinstance(invalid, InvalidRequest) and invalid.field == field
    assert isinstance(valid, DiffusionResponse)


def weights_of(weight: float) -> Callable[[], DiffusionRequest]:
    def make() -> DiffusionRequest:
        req = request(adapters=["a"])
        req.adapter_weights = [weight]  # the contract refuses this at parsing; the backend checks again
        return req

    return make


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 1e308, -10.5])
def test_adapter_weights_must_be_finite_and_at_most_10(backend: FluxBackend, weight: float) -> None:
    with pytest.raises(ValidationError) as parsed:
        request(adapters=["a"], adapter_weights=[weight])
    assert [error["loc"][0] for error in parsed.value.errors()] == ["adapter_weights"]
    assert_refused_before_any_event(
        backend, weights_of(weight), "adapter_weights", "must be a finite number from -10 to 10"
    )


def test_configured_adapter_weights_must_be_finite_and_at_most_10(weights: dict[str, Path]) -> None:
    for weight in (math.nan, math.inf, 11.0):
        options = {"adapters": [{"name": "a", "source": {"path": str(weights["a"])}, "weight": weight}]}
        with pytest.raises(ValidationError, match="weight"):
            FluxBackend(
                DeploymentConfig(name="flux", model=ModelSource(path=str(weights["pipeline"])), options=options)
            )


@pytest.fixture
def tokenized(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text any tokenizer is asked to encode from now on (CLIP's and T5's alike)."""
    lengths: list[int] = []
    call = PreTrainedTokenizerBase.__call__

    def recorded(tokenizer: PreTrainedTokenizerBase, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        lengths.extend(len(item) for item in ([text] if isinstance(text, str) else text or []))
        return call(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", recorded)
    return lengths


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_huge_prompt_is_refused_without_tokenising_it(backend: FluxBackend, tokenized: list[int], field: str) -> None:
    huge = "a red fox in the snow " * 500_000  # 11 MB
    invalid, valid = backend.predict_batch([request(**{field: huge}), request()])
    assert isinstance(invalid, InvalidRequest) and invalid.field == field
    assert re.search(r"is \d+ characters besides whitespace; this deployment reads at most 512 tokens", str(invalid))
    assert isinstance(valid, DiffusionResponse)
    with pytest.raises(InvalidRequest) as raised:
        next(backend.stream(request(**{field: huge}), threading.Event()))
    assert raised.value.field == field
    assert tokenized and max(tokenized) < 10_000  # the valid request's texts only


def test_the_length_bound_never_refuses_a_prompt_that_fits(backend: FluxBackend, tokenized: list[int]) -> None:
    # The vocabulary's longest word, as many times as T5 reads (its end-of-text token takes the last place).
    longest = max((piece for piece in backend.pipe.tokenizer_2.get_vocab() if piece.startswith("▁")), key=len)
    longest_words = " ".join([longest[1:]] * 511)
    padded = "a red fox" + " \n\t" * 1_000_000 + "in the snow"  # 3 MB, 6 tokens: whitespace only separates words
    for prompt in (longest_words, padded):
        outcome = predict(backend, request(prompt=prompt, num_inference_steps=1))
        assert outcome.image_b64
    assert max(tokenized) < 10_000  # the padding's whitespace never reached a tokenizer either
    one_more = predict_batch_one(backend, request(prompt=longest_words + " " + longest[1:]))
    assert isinstance(one_more, InvalidRequest) and "is 513 tokens" in one_more.message


def predict_batch_one(backend: FluxBackend, req: DiffusionRequest) -> DiffusionResponse | Exception:
    (outcome,) = backend.predict_batch([req])
    return outcome


# -- streams that share a batch ----------------------------------------------------------------


class Collected:
    """`stream_batch`'s hand-over, per request index: what came, in order."""

    def __init__(self, count: int) -> None:
        self.events: list[list[Any]] = [[] for _ in range(count)]
        self.cancels = [threading.Event() for _ in range(count)]

    def emit(self, index: int, event: Any) -> None:
        self.events[index].append(event)

    def result(self, index: int) -> DiffusionResponse:
        last = self.events[index][-1]
        assert isinstance(last, ResultEvent) and isinstance(last.response, DiffusionResponse), last
        return last.response

    def steps(self, index: int) -> list[int]:
        return [event.step for event in self.events[index] if isinstance(event, ProgressEvent)]


def test_a_predict_sharing_a_loop_gets_no_progress_and_no_previews_decoded(
    backend: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [request(seed=1, preview_every=1), request(seed=2, preview_every=2)]
    expected = [pixels(predict(backend, req)) for req in requests]
    decoded: list[int] = []
    preview = backend._preview

    def counted(latents: Any, shape: Any) -> Any:
        decoded.append(1)
        return preview(latents, shape)

    monkeypatch.setattr(backend, "_preview", counted)
    got = Collected(len(requests))
    backend.stream_batch(requests, got.cancels, got.emit, None, [False, True])  # the first is a predict
    assert [type(event) for event in got.events[0]] == [Admitted, ResultEvent]
    assert got.steps(1) == [1, 2, 3, 4] and len(decoded) == 2  # the stream's previews at steps 2 and 4 only
    assert [pixels(got.result(index)) for index in (0, 1)] == expected


def test_streams_of_one_setting_share_one_denoising_loop(backend: FluxBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [request(seed=seed, preview_every=2 if seed == 2 else 0) for seed in (1, 2, 3, 4)]
    expected = [pixels(predict(backend, req)) for req in requests]
    calls = count_denoising_steps(monkeypatch, backend)
    got = Collected(len(requests))
    backend.stream_batch(requests, got.cancels, got.emit)
    assert calls[0] == 4  # one loop of 4 steps for all four, not four loops
    for index in range(len(requests)):
        assert got.events[index][0] is ADMITTED
        assert got.steps(index) == [1, 2, 3, 4]
        assert pixels(got.result(index)) == expected[index]  # the same image as alone
        assert got.result(index).metadata["batch_size"] == 4
        previews = [event.preview_b64 is not None for event in got.events[index] if isinstance(event, ProgressEvent)]
        assert previews == ([False, True, False, True] if index == 1 else [False] * 4)  # only for the one that asked


def test_a_stream_that_leaves_its_batch_hears_nothing_more_and_the_rest_finish(
    backend: FluxBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sheaf.backends.flux")
    requests = [request(seed=seed, num_inference_steps=6) for seed in (1, 2, 3)]
    expected = [pixels(predict(backend, req)) for req in requests]
    got = Collected(len(requests))

    def emit(index: int, event: Any) -> None:
        got.emit(index, event)
        if index == 0 and isinstance(event, ProgressEvent) and event.step == 2:
            got.cancels[0].set()  # its client has gone

    backend.stream_batch(requests, got.cancels, emit)
    assert got.steps(0) == [1, 2]
    assert not any(isinstance(event, ResultEvent) for event in got.events[0])
    assert [pixels(got.result(i)) for i in (1, 2)] == expected[1:]
    # The loop saw it gone at the next step.
    assert f"stream {requests[0].request_id} cancelled after 3 steps" in caplog.messages


def test_every_stream_of_a_batch_leaving_stops_its_loop(backend: FluxBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_denoising_steps(monkeypatch, backend)
    requests = [request(seed=seed, num_inference_steps=200) for seed in (1, 2)]
    got = Collected(len(requests))

    def emit(index: int, event: Any) -> None:
        got.emit(index, event)
        if isinstance(event, ProgressEvent) and event.step == 3:
            got.cancels[index].set()

    backend.stream_batch(requests, got.cancels, emit)
    assert calls[0] <= 4  # the step running when the last one left may finish; no other starts
    assert all(not any(isinstance(e, ResultEvent) for e in events) for events in got.events)
    assert_lock_free(backend)


@pytest.mark.parametrize(("mode", "batch_sizes"), [("grouped", [2, 1, 2, 1, 1]), ("mixed", [5] * 5)])
def test_a_batch_of_streams_runs_a_group_per_selection_without_bleed(
    mode: str, batch_sizes: list[int], backend: FluxBackend, grouped: FluxBackend
) -> None:
    """Grouped: one denoising loop per selection; mixed: one for all five."""
    backend = backend if mode == "mixed" else grouped
    requests = [request(seed=5, **SELECTIONS[name]) for name in ("a", "b", "a", "none", "a+b")]
    expected = [pixels(predict(backend, req)) for req in requests]
    assert len(set(expected)) == 4  # each selection draws its own image
    got = Collected(len(requests))
    backend.stream_batch(requests, got.cancels, got.emit)
    assert [pixels(got.result(i)) for i in range(len(requests))] == expected
    assert [got.result(i).metadata["batch_size"] for i in range(len(requests))] == batch_sizes


def test_an_invalid_stream_of_a_batch_is_refused_alone(backend: FluxBackend) -> None:
    requests = [request(seed=1), request(adapters=["nosuch"]), request(seed=2)]
    got = Collected(len(requests))
    backend.stream_batch(requests, got.cancels, got.emit)
    (refusal,) = got.events[1]
    assert isinstance(refusal, InvalidRequest) and "nosuch" in str(refusal)
    assert [got.steps(i) for i in (0, 2)] == [[1, 2, 3, 4]] * 2
    assert pixels(got.result(0)) == pixels(predict(backend, requests[0]))


# -- cancellation and failures -----------------------------------------------------------------


def test_cancel_stops_the_stream_within_one_step(
    backend: FluxBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sheaf.backends.flux")
    calls = count_denoising_steps(monkeypatch, backend)
    req = request(num_inference_steps=200)
    cancel = threading.Event()
    received: list[Any] = []
    started_at_cancel = 0
    for event in events(backend.stream(req, cancel)):
        received.append(event)
        if isinstance(event, ProgressEvent) and event.step == 3:
            started_at_cancel = calls[0]
            cancel.set()
    # Nothing follows the cancel: no more progress, and no result for a client that has gone.
    assert [event.step for event in received] == [1, 2, 3]
    # The step running when cancel was set may finish; no other starts.
    assert 3 <= calls[0] <= started_at_cancel + 1
    assert f"stream {req.request_id} cancelled after {calls[0]} steps" in caplog.messages
    assert_lock_free(backend)


def test_closing_the_stream_early_stops_it(
    backend: FluxBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sheaf.backends.flux")
    calls = count_denoising_steps(monkeypatch, backend)
    req = request(num_inference_steps=200)
    stream = backend.stream(req, threading.Event())
    assert next(stream) is ADMITTED
    first, second = next(stream), next(stream)
    assert isinstance(first, ProgressEvent) and isinstance(second, ProgressEvent)
    assert (first.step, second.step) == (1, 2)
    started_at_close = calls[0]
    assert isinstance(stream, Generator)
    stream.close()
    assert calls[0] <= started_at_close + 1
    assert f"stream {req.request_id} cancelled after {calls[0]} steps" in caplog.messages
    assert_lock_free(backend)


def test_cancel_while_waiting_for_the_lock_ends_the_stream(
    backend: FluxBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sheaf.backends.flux")
    req = request()
    cancel = threading.Event()
    received: list[Any] = []
    consumer = threading.Thread(target=lambda: received.extend(backend.stream(req, cancel)), daemon=True)
    with backend.adapters.hold(()):  # someone else's run holds the pipeline
        consumer.start()
        while backend.adapters.waiting == 0 or not received:  # until the stream queues for its turn, accepted
            time.sleep(0.005)
        cancel.set()
        consumer.join(60)  # a guard against a hang: the stream leaves the queue at once
        assert not consumer.is_alive()
    assert received == [ADMITTED]  # accepted at once, while it waited its turn
    assert f"stream {req.request_id} cancelled after 0 steps" in caplog.messages
    assert_lock_free(backend)


def test_cancel_stops_a_batched_predict_within_one_step(backend: FluxBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = pixels(predict(backend, request(seed=1)))
    # Two groups of 200 steps (the second with other adapters): cancelled in the first, the second never runs.
    batch = [request(num_inference_steps=200, seed=s, adapters=adapters) for s in (1, 2) for adapters in ([], ["a"])]
    third = threading.Event()

    def slow(call: int, kwargs: Any) -> None:  # 10 ms a step: the batch would take over 4 s
        time.sleep(0.01)
        if call == 3:
            third.set()

    calls = count_denoising_steps(monkeypatch, backend, slow)
    at_cancel, waited = cancel_on_cue(backend, batch, third, calls)
    assert calls[0] <= at_cancel + 1  # the step running at the cancel may finish; no other starts
    assert waited < 1.0
    monkeypatch.undo()
    assert_lock_free(backend)
    assert pixels(predict(backend, request(seed=1))) == expected


def test_cancel_while_waiting_for_the_lock_ends_the_predict(backend: FluxBackend) -> None:
    cancel = threading.Event()
    with backend.adapters.hold(()), ThreadPoolExecutor(1) as pool:  # someone else's run holds the pipeline
        outcome = pool.submit(backend.predict_batch, [request()], cancel)
        while backend.adapters.waiting == 0:  # until the predict queues for its turn
            time.sleep(0.005)
        cancel.set()
        with pytest.raises(Cancelled):
            outcome.result(60)  # a guard against a hang: the predict leaves the queue at once
    assert_lock_free(backend)


def test_a_pipeline_failure_mid_stream_follows_the_events_before_it(
    backend: FluxBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_third(call: int, kwargs: Any) -> None:
        if call == 3:
            raise RuntimeError("boom at step 3")

    count_denoising_steps(monkeypatch, backend, fail_third)
    received: list[Any] = []
    with pytest.raises(RuntimeError, match="boom at step 3"):
        for event in events(backend.stream(request(num_inference_steps=10), threading.Event())):
            received.append(event)
    assert [event.step for event in received] == [1, 2]
    monkeypatch.undo()
    assert_lock_free(backend)


def test_a_failing_group_fails_only_its_own_requests(backend: FluxBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    small = request(height=32, width=32, seed=5)
    other = request(height=32, width=32, seed=6, adapters=["a"])
    expected = [pixels(predict(backend, small)), pixels(predict(backend, other))]

    def fail_48(call: int, kwargs: Any) -> None:
        if kwargs["hidden_states"].shape[1] == 9:  # 48x48 pixels: 3x3 packed latent patches
            raise RuntimeError("this group's call failed")

    count_denoising_steps(monkeypatch, backend, fail_48)
    outcomes = backend.predict_batch([small, request(height=48, width=48), other, request(height=48, width=48, seed=3)])
    assert isinstance(outcomes[1], RuntimeError) and isinstance(outcomes[3], RuntimeError)
    assert isinstance(outcomes[0], DiffusionResponse) and isinstance(outcomes[2], DiffusionResponse)
    assert [pixels(outcomes[0]), pixels(outcomes[2])] == expected


# -- builders ----------------------------------------------------------------------------------


def test_build_sources_are_deterministic_and_load(
    backend: FluxBackend, weights: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEAF_CACHE_DIR", str(tmp_path))
    built = FluxBackend(
        DeploymentConfig(
            name="flux",
            model=ModelSource(build="tiny.models:build_tiny_flux"),
            options={
                "adapters": [
                    {"name": "a", "source": {"build": "tiny.models:build_tiny_flux_lora_a"}},
                    {"name": "b", "source": {"build": "tiny.models:build_tiny_flux_lora_b"}},
                ]
            },
        )
    )
    built.load()
    cache = tmp_path / "built"
    for name, folder in (
        ("pipeline", "tiny.models--build_tiny_flux"),
        ("a", "tiny.models--build_tiny_flux_lora_a"),
        ("b", "tiny.models--build_tiny_flux_lora_b"),
    ):
        assert _files(cache / folder) == _files(weights[name]), f"{name} was built differently the second time"
    req = request(**SELECTIONS["a+b"])
    assert pixels(predict(built, req)) == pixels(predict(backend, req))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
