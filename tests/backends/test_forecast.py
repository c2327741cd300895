"""The forecasting backend in process, on a tiny random TimesFM built on the fly."""

import math
import threading
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from sheaf.api.events import ResultEvent
from sheaf.api.feature_ref import FeatureRef
from sheaf.api.forecast import ForecastRequest, ForecastResponse, Frequency
from sheaf.backends.forecast import FREQUENCY_BUCKETS, QUICK_CHECK_VALUES, ForecastBackend
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest
from tests.backends.cancelling import cancel_on_cue
from tiny.timesfm import CONTEXT_LENGTH, HORIZON_LENGTH, build_tiny_timesfm

MAX_HORIZON = 64  # the deployment's options
MAX_HISTORY = 512
REL = 1e-5  # batched against alone


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine the OpenMP workers
    wait on each other: one forecast of the tiny model took 0.3 s with 2 threads against 2 ms with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_timesfm(tmp_path_factory.mktemp("tiny-timesfm") / "model")


def make_backend(source: ModelSource) -> ForecastBackend:
    config = DeploymentConfig(
        name="forecast", model=source, options={"max_horizon": MAX_HORIZON, "max_history": MAX_HISTORY}
    )
    backend = ForecastBackend(config)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> ForecastBackend:
    return make_backend(ModelSource(path=str(tiny_model)))


def wave(length: int, phase: float = 0.0, level: float = 10.0) -> list[float]:
    """A distinct, deterministic history: a sine with a trend."""
    return [level + 5 * math.sin(i / 3 + phase) + 0.05 * i for i in range(length)]


def request(**fields: Any) -> ForecastRequest:
    if "feature_ref" not in fields:
        fields.setdefault("history", wave(40))
    return ForecastRequest(**fields)


def predict(backend: ForecastBackend, req: ForecastRequest) -> ForecastResponse:
    (outcome,) = backend.predict_batch([req])
    assert isinstance(outcome, ForecastResponse), outcome
    return outcome


def responses(outcomes: list[ForecastResponse | Exception]) -> list[ForecastResponse]:
    assert all(isinstance(outcome, ForecastResponse) for outcome in outcomes), outcomes
    return typing.cast(list[ForecastResponse], outcomes)


def assert_same_forecast(got: ForecastResponse, expected: ForecastResponse) -> None:
    assert (got.horizon, got.frequency, got.request_id) == (expected.horizon, expected.frequency, expected.request_id)
    assert got.mean == pytest.approx(expected.mean, rel=REL, abs=1e-6)
    if expected.quantiles is None:
        assert got.quantiles is None
    else:
        assert got.quantiles is not None and got.quantiles.keys() == expected.quantiles.keys()
        for key, values in expected.quantiles.items():
            assert got.quantiles[key] == pytest.approx(values, rel=REL, abs=1e-6)
    if expected.samples is None:
        assert got.samples is None
    else:
        assert got.samples is not None and len(got.samples) == len(expected.samples)
        for path, expected_path in zip(got.samples, expected.samples, strict=True):
            assert path == pytest.approx(expected_path, rel=REL, abs=1e-6)


def count_model_calls(monkeypatch: pytest.MonkeyPatch, backend: ForecastBackend) -> list[int]:
    """The number of series in each model call, as the calls happen."""
    forward = backend.model.forward
    rows: list[int] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        rows.append(len(kwargs["past_values"]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", wrapped)
    return rows


def sorted_heads(backend: ForecastBackend, series: list[float]) -> torch.Tensor:
    """The model's own quantile heads for one series ([horizon_length, heads]), sorted at each step."""
    with torch.inference_mode():
        output = backend.model(past_values=[torch.tensor(series, dtype=torch.float32)], freq=[0])
    return typing.cast(torch.Tensor, output.full_predictions[0, :, 1:].double().sort(dim=-1).values)


# -- the tiny model ------------------------------------------------------------------------------


def test_the_tiny_model_is_small_and_the_same_every_build(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_timesfm(tmp_path / "again")
    assert again == tmp_path / "again"
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert len(weights) < 1_000_000


def test_a_build_source_is_built_into_the_cache_and_answers_like_the_path(
    backend: ForecastBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHEAF_CACHE_DIR", str(tmp_path))
    built = make_backend(ModelSource(build="tiny.timesfm:build_tiny_timesfm"))
    assert (tmp_path / "built" / "tiny.timesfm--build_tiny_timesfm" / "config.json").is_file()
    req = request(output_mode="quantiles")
    assert_same_forecast(predict(built, req), predict(backend, req))


def test_options_are_checked(tiny_model: Path) -> None:
    with pytest.raises(ValidationError):
        ForecastBackend(DeploymentConfig(name="forecast", model=ModelSource(path="x"), options={"max_horizn": 5}))
    with pytest.raises(RuntimeError, match="load"):
        ForecastBackend(DeploymentConfig(name="forecast", model=ModelSource(path=str(tiny_model)))).model  # noqa: B018


# -- horizons and batching -----------------------------------------------------------------------


def test_mixed_horizons_share_one_model_call_and_each_gets_its_own(
    backend: ForecastBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    horizons = [1, 5, HORIZON_LENGTH, 3, 9]
    reqs = [
        request(history=wave(length, phase=i), horizon=horizon, model_name=f"m{i}", frequency=frequency)
        for i, (length, horizon, frequency) in enumerate(
            zip([1, 7, 40, 128, 300], horizons, ["1min", "1h", "1d", "1W", "1M"], strict=True)
        )
    ]
    calls = count_model_calls(monkeypatch, backend)
    got = responses(backend.predict_batch(reqs))
    assert calls == [len(reqs)]
    for req, response, horizon in zip(reqs, got, horizons, strict=True):
        assert (response.horizon, len(response.mean)) == (horizon, horizon)
        assert (response.request_id, response.model_name) == (req.request_id, req.model_name)
        assert response.frequency == req.frequency and response.model_type == "time_series"
        assert response.quantiles is None and response.samples is None
        assert response.metadata["batch_size"] == len(reqs) and response.metadata["model_calls"] == 1
        assert response.metadata["inference_ms"] >= 0
        assert all(math.isfinite(value) for value in response.mean)


def test_horizons_beyond_the_model_decode_in_batched_rounds(
    backend: ForecastBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    horizons = [4, HORIZON_LENGTH, HORIZON_LENGTH + 1, MAX_HORIZON]
    reqs = [request(history=wave(30 + 20 * i, phase=i), horizon=h) for i, h in enumerate(horizons)]
    alone = [predict(backend, req) for req in reqs]
    calls = count_model_calls(monkeypatch, backend)
    got = responses(backend.predict_batch(reqs))
    # Every request in the first round, then only those still short of their horizon.
    assert calls == [4, 2, 1, 1]
    for response, expected, horizon in zip(got, alone, horizons, strict=True):
        assert len(response.mean) == horizon
        assert_same_forecast(response, expected)
    # A longer horizon only appends to the shorter one: its first steps come from the same first call.
    short = predict(backend, request(history=wave(110, phase=3), horizon=HORIZON_LENGTH, output_mode="quantiles"))
    long = predict(backend, request(history=wave(110, phase=3), horizon=MAX_HORIZON, output_mode="quantiles"))
    assert long.mean[:HORIZON_LENGTH] == pytest.approx(short.mean, rel=REL)
    assert long.quantiles is not None and short.quantiles is not None
    assert long.quantiles["0.9"][:HORIZON_LENGTH] == pytest.approx(short.quantiles["0.9"], rel=REL)


def test_a_batched_answer_equals_the_answer_alone(backend: ForecastBackend) -> None:
    frequencies: list[Frequency] = ["1min", "5min", "15min", "1h", "1d", "1W", "1M"]
    modes: list[typing.Literal["mean", "quantiles", "samples"]] = ["mean", "quantiles", "samples"]
    reqs = [
        request(
            history=wave(1 + (37 * i) % 300, phase=i / 5, level=i - 10),
            horizon=1 + (13 * i) % 40,
            frequency=frequencies[i % len(frequencies)],
            output_mode=modes[i % len(modes)],
            quantile_levels=[0.05, 0.3, 0.5, 0.77],
            num_samples=3 + i % 5,
        )
        for i in range(32)
    ]
    got = responses(backend.predict_batch(reqs))
    assert {response.metadata["batch_size"] for response in got} == {32}
    for req, response in zip(reqs, got, strict=True):
        assert_same_forecast(response, predict(backend, req))


def test_a_long_history_is_read_up_to_the_model_context(backend: ForecastBackend) -> None:
    history = wave(300)
    full = predict(backend, request(history=history, horizon=20))
    last = predict(backend, request(history=history[-CONTEXT_LENGTH:], horizon=20))
    assert full.mean == pytest.approx(last.mean, rel=REL)
    assert full.metadata["history_used"] == CONTEXT_LENGTH
    assert predict(backend, request(history=wave(9))).metadata["history_used"] == 9


def test_frequencies_map_to_timesfm_buckets(backend: ForecastBackend) -> None:
    # TimesFM's own `freq_map`: minutes, hours and days are high (0); weeks and months medium (1).
    high, medium = ["1min", "5min", "15min", "1h", "1d"], ["1W", "1M"]
    expected = {**dict.fromkeys(high, 0), **dict.fromkeys(medium, 1)}
    assert expected == FREQUENCY_BUCKETS
    assert set(FREQUENCY_BUCKETS) == set(typing.get_args(Frequency))
    means = {frequency: predict(backend, request(frequency=frequency)).mean for frequency in FREQUENCY_BUCKETS}
    for group in (high, medium):
        for frequency in group:
            assert means[frequency] == pytest.approx(means[group[0]], rel=REL), frequency
    assert means["1h"] != pytest.approx(means["1W"], rel=1e-3)  # the buckets have their own embeddings


# -- uncertainty ---------------------------------------------------------------------------------


def test_mean_mode_gives_the_mean_only(backend: ForecastBackend) -> None:
    response = predict(backend, request(horizon=7))
    assert len(response.mean) == 7 and response.quantiles is None and response.samples is None


def test_quantiles_have_the_asked_levels_and_never_decrease(backend: ForecastBackend) -> None:
    levels = [0.95, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9]  # in any order
    response = predict(backend, request(horizon=30, output_mode="quantiles", quantile_levels=levels))
    assert response.quantiles is not None and response.samples is None
    assert set(response.quantiles) == {"0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95"}
    assert all(len(values) == 30 for values in response.quantiles.values())
    ordered = [response.quantiles[str(level)] for level in sorted(levels)]
    for step in range(30):
        column = [values[step] for values in ordered]
        assert column == sorted(column), step
    assert any(response.quantiles["0.95"][step] > response.quantiles["0.05"][step] for step in range(30))


def test_quantiles_come_from_the_sorted_heads(backend: ForecastBackend) -> None:
    """The heads are at 0.1, 0.2 ... 0.9: a head's level gives its (sorted) value, others interpolate."""
    history = wave(50, phase=1.0)
    heads = sorted_heads(backend, history)
    levels = [0.05, 0.1, 0.25, 0.5, 0.9, 0.95]
    response = predict(
        backend, request(history=history, horizon=HORIZON_LENGTH, output_mode="quantiles", quantile_levels=levels)
    )
    assert response.quantiles is not None
    expected = {
        "0.05": heads[:, 0] - 0.5 * (heads[:, 1] - heads[:, 0]),  # the lowest segment, extended
        "0.1": heads[:, 0],
        "0.25": (heads[:, 1] + heads[:, 2]) / 2,
        "0.5": heads[:, 4],
        "0.9": heads[:, 8],
        "0.95": heads[:, 8] + 0.5 * (heads[:, 8] - heads[:, 7]),
    }
    for key, values in expected.items():
        assert response.quantiles[key] == pytest.approx(values.tolist(), rel=REL, abs=1e-5), key


def test_samples_have_their_shape_and_repeat_for_the_same_request(backend: ForecastBackend) -> None:
    first = predict(backend, request(horizon=20, output_mode="samples", num_samples=7))
    assert first.samples is not None and first.quantiles is None
    assert len(first.samples) == 7 and all(len(path) == 20 for path in first.samples)
    assert len({tuple(path) for path in first.samples}) == 7
    again = predict(backend, request(horizon=20, output_mode="samples", num_samples=7))  # another request_id
    assert again.request_id != first.request_id and again.samples == first.samples
    other = predict(backend, request(history=wave(41), horizon=20, output_mode="samples", num_samples=7))
    assert other.samples is not None and other.samples[0] != first.samples[0]


def test_samples_follow_the_quantiles(backend: ForecastBackend) -> None:
    history = wave(60, phase=2.0)
    quantiles = predict(
        backend, request(history=history, horizon=16, output_mode="quantiles", quantile_levels=[0.1, 0.5, 0.9])
    ).quantiles
    samples = predict(backend, request(history=history, horizon=16, output_mode="samples", num_samples=1000)).samples
    assert quantiles is not None and samples is not None
    for key, level in (("0.1", 0.1), ("0.5", 0.5), ("0.9", 0.9)):
        below = sum(path[step] <= quantiles[key][step] for path in samples for step in range(16)) / (1000 * 16)
        assert below == pytest.approx(level, abs=0.02), key


def test_a_column_of_rows_forecasts_like_that_column_alone(backend: ForecastBackend) -> None:
    columns = [wave(45, phase=0.0), wave(45, phase=1.5, level=-3), wave(45, phase=2.5, level=100)]
    rows = [list(row) for row in zip(*columns, strict=True)]
    for mode in ("mean", "quantiles", "samples"):
        from_rows = predict(backend, request(history=rows, target_index=1, horizon=24, output_mode=mode))
        alone = predict(backend, request(history=columns[1], horizon=24, output_mode=mode))
        from_rows.request_id = alone.request_id
        assert_same_forecast(from_rows, alone)
    first = predict(backend, request(history=rows, target_index=0, horizon=24))
    assert first.mean != pytest.approx(predict(backend, request(history=rows, target_index=1, horizon=24)).mean)


# -- failures ------------------------------------------------------------------------------------


def test_invalid_requests_fail_alone(backend: ForecastBackend) -> None:
    good = [request(history=wave(30), horizon=10), request(history=wave(80, phase=1), horizon=30)]
    unresolved = request(feature_ref=FeatureRef(feature_view="v", feature_name="f", entity_key="k", entity_value="1"))
    bad = {
        "horizon": request(horizon=MAX_HORIZON + 1),
        "history": request(history=wave(MAX_HISTORY + 1)),
        "feature_ref": unresolved,
    }
    not_finite = request(history=[1.0, math.nan, 2.0])
    too_large = request(history=[1e178, -7e98, 2e16] * 4)  # overflows float32 inside the model
    batch = [good[0], *bad.values(), not_finite, too_large, good[1]]
    outcomes = backend.predict_batch(batch)
    for outcome, field in zip(outcomes[1:-1], [*bad, "history", "history"], strict=True):
        assert isinstance(outcome, InvalidRequest) and outcome.field == field, outcome
    assert "above this deployment's limit of 64" in str(outcomes[1])
    assert "at most 512" in str(outcomes[2])
    for outcome, req in zip([outcomes[0], outcomes[-1]], good, strict=True):
        assert isinstance(outcome, ForecastResponse) and outcome.metadata["batch_size"] == 2
        assert_same_forecast(outcome, predict(backend, req))


def test_values_that_overflow_the_model_inside_the_limit_are_refused_not_answered_with_nan(
    backend: ForecastBackend,
) -> None:
    huge, fine = request(history=[1e20, -1e20, 3e19] * 8, horizon=8), request(history=wave(30), horizon=8)
    refused, answered = backend.predict_batch([huge, fine])
    assert isinstance(refused, InvalidRequest) and refused.field == "history"
    assert "not finite" in str(refused)
    assert isinstance(answered, ForecastResponse) and all(math.isfinite(v) for v in answered.mean)


def test_a_failed_model_call_fails_its_rows_and_leaves_invalid_ones_their_own_error(
    backend: ForecastBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(backend.model, "forward", broken)
    outcomes = backend.predict_batch([request(), request(horizon=MAX_HORIZON + 1), request()])
    assert [type(outcome) for outcome in outcomes] == [RuntimeError, InvalidRequest, RuntimeError]


def test_cancel_stops_a_long_horizon_between_rounds(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DeploymentConfig(name="forecast", model=ModelSource(path=str(tiny_model)), options={"max_horizon": 10_000})
    backend = ForecastBackend(config)
    backend.load()
    batch = [request(horizon=10_000), request(history=wave(60, phase=1), horizon=10_000)]  # 625 rounds each
    short = request(horizon=40)
    expected = predict(backend, short)
    forward = backend.model.forward
    calls = [0]
    third = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:  # 10 ms a round: the batch would take over 6 s
        calls[0] += 1
        time.sleep(0.01)
        if calls[0] == 3:
            third.set()
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", slow)
    at_cancel, waited = cancel_on_cue(backend, batch, third, calls)
    assert calls[0] <= at_cancel + 1  # the round running at the cancel may finish; no other starts
    assert waited < 1.0
    monkeypatch.undo()
    assert_same_forecast(predict(backend, short), expected)


# -- streaming -----------------------------------------------------------------------------------


def test_the_default_stream_sends_one_result_equal_to_predict(backend: ForecastBackend) -> None:
    req = request(horizon=20, output_mode="samples", num_samples=4)
    events = list(backend.stream(req, threading.Event()))
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, ResultEvent) and isinstance(event.response, ForecastResponse)
    expected = predict(backend, req)
    assert event.response.model_dump(exclude={"metadata"}) == expected.model_dump(exclude={"metadata"})
    assert event.response.metadata["batch_size"] == 1
    with pytest.raises(InvalidRequest):
        list(backend.stream(request(horizon=MAX_HORIZON + 1), threading.Event()))


def test_only_short_histories_are_checked_on_the_event_loop(backend: ForecastBackend) -> None:
    assert backend.quick_check(ForecastRequest(history=[1.0] * QUICK_CHECK_VALUES, horizon=4))
    assert not backend.quick_check(ForecastRequest(history=[1.0] * (QUICK_CHECK_VALUES + 1), horizon=4))
