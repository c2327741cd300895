"""The wire contract end to end: a real `bentoml serve`, the real backend on a tiny model."""

import asyncio
import base64
import io
import json
import re
import time
import wave
from typing import Any

import httpx
import pytest

from sheaf import ResultEvent, SheafClient, TextGenerationRequest
from sheaf.gateway import tracing_settings
from sheaf.streaming import SSEDecoder
from tests.conftest import Server, leave_stream_after, predict_at_once

pytestmark = pytest.mark.together_and_apart  # the contract holds with the deployments served apart too

PROMPT = {"model_type": "text_generation", "model_name": "tiny", "prompt": "the quick brown fox", "max_new_tokens": 12}
RESPONSE_FIELDS = {
    "request_id",
    "model_type",
    "model_name",
    "metadata",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
}


def stream_events(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    decoder = SSEDecoder()
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{server.url}/textgen/stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            events.extend(decoder.feed(chunk))
    assert not decoder.pending
    return events


def predict(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/textgen/predict", json=body, timeout=60)


def test_predict_answers_every_field(server: Server) -> None:
    response = predict(server, {**PROMPT, "request_id": "req-1"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == RESPONSE_FIELDS
    assert body["request_id"] == "req-1"
    assert body["model_type"] == "text_generation"
    assert body["model_name"] == "tiny"
    assert body["finish_reason"] in ("stop", "length")
    assert 0 < body["completion_tokens"] <= 12
    assert body["metadata"]["batch_size"] == 1
    # No tracing exporter is configured, so the entry service builds no spans (the request-id
    # header comes from BentoML's span).
    assert "x-bentoml-request-id" not in response.headers


def test_the_entry_service_traces_only_when_an_exporter_is_configured() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert tracing_settings() == {"excluded_urls": [".*"]}
    BentoMLContainer.config.tracing.exporter_type.set("otlp")
    try:
        assert tracing_settings() == {}
    finally:
        BentoMLContainer.config.tracing.exporter_type.set(None)


def test_server_makes_a_request_id_when_absent(server: Server) -> None:
    first, second = (predict(server, PROMPT).json()["request_id"] for _ in range(2))
    assert re.fullmatch(r"[0-9a-f-]{36}", first)
    assert first != second


def test_stream_sends_tokens_then_one_result_equal_to_greedy_predict(server: Server) -> None:
    events = stream_events(server, {**PROMPT, "request_id": "req-2"})
    *tokens, result = events
    assert tokens and all(event["type"] == "token" and event["done"] is False for event in tokens)
    assert [event["index"] for event in tokens] == list(range(len(tokens)))
    assert result["type"] == "result"
    assert result["done"] is True
    assert set(result) == RESPONSE_FIELDS | {"type", "done"}
    assert result["request_id"] == "req-2"
    assert result["text"] == "".join(event["text"] for event in tokens)
    assert result["text"] == predict(server, PROMPT).json()["text"]


def test_concurrent_predicts_are_batched_and_each_gets_its_own_answer(server: Server) -> None:
    bodies = [{**PROMPT, "prompt": f"story number {i} begins", "request_id": f"batch-{i}"} for i in range(16)]
    alone = [predict(server, body).json()["text"] for body in bodies]

    answers = [response.json() for response in predict_at_once(server, "textgen", bodies)]
    assert [answer["request_id"] for answer in answers] == [body["request_id"] for body in bodies]
    sizes = [answer["metadata"]["batch_size"] for answer in answers]
    model_calls = sum(1 / size for size in sizes)  # each call's members all report its size
    assert max(sizes) > 1
    assert round(model_calls) < 16
    assert [answer["text"] for answer in answers] == alone


def test_an_error_in_one_request_does_not_fail_its_batch(server: Server) -> None:
    bodies = [{**PROMPT, "request_id": f"iso-{i}"} for i in range(6)]
    bodies[3]["model_name"] = "fail-in-batch"

    responses = predict_at_once(server, "textgen", bodies)
    assert [r.status_code for r in responses] == [200, 200, 200, 500, 200, 200]
    assert responses[3].json() == {"detail": "InjectedFault: injected for this request"}
    assert max(r.json()["metadata"]["batch_size"] for r in responses if r.status_code == 200) > 1


def test_a_failure_after_the_first_event_ends_the_stream_with_an_error_event(server: Server) -> None:
    events = stream_events(server, {**PROMPT, "model_name": "fail-mid-stream"})
    assert [event["type"] for event in events] == ["token", "token", "error"]
    assert events[-1]["done"] is True
    assert events[-1]["error"] == "InjectedFault: injected after two events"
    assert predict(server, PROMPT).status_code == 200  # and the server goes on serving


BAD_BODIES = {
    "malformed JSON": ('{"model_type": "text_generation", "prompt": ', "body"),
    "missing field": ('{"model_type": "text_generation", "messages": [{"role": "user"}]}', "content"),
    "wrong type": ('{"model_type": "text_generation", "prompt": "hi", "max_new_tokens": "many"}', "max_new_tokens"),
    "wrong model_type": ('{"model_type": "diffusion", "prompt": "hi"}', "model_type"),
    "out of range": ('{"model_type": "text_generation", "prompt": "hi", "temperature": -1}', "temperature"),
    "neither prompt nor messages": ('{"model_type": "text_generation"}', "prompt"),
    "not an object": ("[1, 2]", "body"),
    "over the token limit": (
        '{"model_type": "text_generation", "prompt": "hi", "max_new_tokens": 31000}',
        "max_new_tokens",
    ),
}


@pytest.mark.parametrize("route", ["predict", "stream"])
@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_input_is_a_422_naming_the_field(server: Server, route: str, case: str) -> None:
    body, field = BAD_BODIES[case]
    response = httpx.post(
        f"{server.url}/textgen/{route}", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert field in json.dumps(detail)


@pytest.mark.parametrize("route", ["predict", "stream"])
def test_a_body_over_the_limit_is_413_declared_or_chunked(server: Server, route: str) -> None:
    body = json.dumps({**PROMPT, "prompt": "x" * (1024 * 1024 + 10)}).encode()
    declared = httpx.post(f"{server.url}/textgen/{route}", content=body, timeout=30)
    chunked = httpx.post(f"{server.url}/textgen/{route}", content=iter([body[:1000], body[1000:]]), timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
    small = httpx.post(f"{server.url}/textgen/{route}", content=iter([json.dumps(PROMPT).encode()]), timeout=30)
    assert small.status_code == 200  # a chunked body under the limit is passed on whole


def test_unknown_deployment_is_404(server: Server) -> None:
    assert httpx.post(f"{server.url}/nosuch/predict", json=PROMPT).status_code == 404


def test_health_and_ready(server: Server) -> None:
    assert httpx.get(f"{server.url}/textgen/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/textgen/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": "textgen"}


def test_a_dropped_stream_stops_generation_and_frees_the_server(server: Server) -> None:
    body = {**PROMPT, "request_id": "dropped-1", "max_new_tokens": 30000}
    leave_stream_after(server, "textgen", body, events=3)
    deadline = time.monotonic() + 30
    while not (match := re.search(r"stream dropped-1 cancelled after (\d+) tokens", server.log_text())):
        assert time.monotonic() < deadline, "the server never stopped generating"
        time.sleep(0.1)
    assert int(match.group(1)) < 30000
    assert predict(server, PROMPT).status_code == 200


def test_batch_answers_each_request_in_order_with_its_own_outcome(server: Server) -> None:
    bodies = [{**PROMPT, "request_id": f"list-{i}", "temperature": 0} for i in range(3)]
    bodies[1] = {**bodies[1], "max_new_tokens": 31000}  # over this deployment's limit: refused alone
    response = httpx.post(f"{server.url}/textgen/batch", json=bodies, timeout=60)
    assert response.status_code == 200, response.text
    outcomes = response.json()
    assert [outcome["status"] for outcome in outcomes] == [200, 422, 200]
    assert [outcomes[i]["body"]["request_id"] for i in (0, 2)] == ["list-0", "list-2"]
    assert "max_new_tokens" in json.dumps(outcomes[1]["body"]["detail"])
    assert outcomes[0]["body"]["text"] == predict(server, bodies[0]).json()["text"]


def test_batch_refuses_more_than_max_batch_size_as_a_whole(server: Server) -> None:
    too_many = httpx.post(f"{server.url}/textgen/batch", json=[PROMPT] * 17, timeout=30)
    assert too_many.status_code == 422
    assert "at most 16 requests" in too_many.json()["detail"][0]["msg"]
    not_a_list = httpx.post(f"{server.url}/textgen/batch", json=PROMPT, timeout=30)
    assert not_a_list.status_code == 422
    assert httpx.post(f"{server.url}/textgen/batch", json=[], timeout=30).json() == []


def test_batch_validates_each_item_on_its_own(server: Server) -> None:
    bodies = [PROMPT, {**PROMPT, "temperature": -1}, "not an object", {**PROMPT, "request_id": "kept"}]
    response = httpx.post(f"{server.url}/textgen/batch", json=bodies, timeout=30)
    assert response.status_code == 200, response.text
    outcomes = response.json()
    assert [outcome["status"] for outcome in outcomes] == [200, 422, 422, 200]
    assert outcomes[1]["body"]["detail"][0]["loc"] == ["body", "temperature"]
    assert outcomes[2]["body"]["detail"][0]["loc"] == ["body"]
    assert outcomes[3]["body"]["request_id"] == "kept"
    only_bad = httpx.post(f"{server.url}/textgen/batch", json=[{**PROMPT, "top_p": 0}], timeout=30)
    assert [outcome["status"] for outcome in only_bad.json()] == [422]


def test_an_unknown_deployment_is_a_json_404_naming_the_ones_that_exist(server: Server) -> None:
    for response in (httpx.post(f"{server.url}/nope/predict", json=PROMPT), httpx.get(f"{server.url}/nope/ready")):
        assert response.status_code == 404
        assert response.json()["deployments"] == ["flux", "forecast", "textgen", "whisper"]
        assert "no deployment named 'nope'" in response.json()["detail"]


def test_docs_leads_to_the_swagger_page(server: Server) -> None:
    response = httpx.get(f"{server.url}/docs", follow_redirects=True)
    assert response.status_code == 200
    assert "swagger" in response.text.lower()
    assert httpx.get(f"{server.url}/docs.json").json()["paths"]["/textgen/predict"]


def test_a_hundred_concurrent_streams_complete_or_get_a_fast_503_with_retry_after(server: Server) -> None:
    body = {**PROMPT, "max_new_tokens": 24}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str | None, list[dict[str, Any]]]:
        started = time.perf_counter()
        decoder = SSEDecoder()
        events: list[dict[str, Any]] = []
        async with client.stream("POST", f"{server.url}/textgen/stream", json=body) as response:
            waited = time.perf_counter() - started
            async for chunk in response.aiter_raw():
                events.extend(decoder.feed(chunk) if response.status_code == 200 else [])
            return response.status_code, waited, response.headers.get("retry-after"), events

    async def hundred() -> list[tuple[int, float, str | None, list[dict[str, Any]]]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(100)))

    answers = asyncio.run(hundred())
    statuses = [status for status, *_ in answers]
    assert set(statuses) == {200, 503}, statuses  # the test server allows 8 streams at once
    for status, waited, retry_after, events in answers:
        if status == 200:
            assert events[-1]["type"] == "result" and [e["type"] for e in events].count("result") == 1
        else:
            assert retry_after == "2"
            assert waited < 5.0  # refused at once, not queued
    assert predict(server, PROMPT).status_code == 200  # and afterwards the service answers normally


def test_predicts_past_max_pending_get_a_fast_503_with_retry_after(server: Server) -> None:
    body = {**PROMPT, "max_new_tokens": 400}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str | None]:
        started = time.perf_counter()
        response = await client.post(f"{server.url}/textgen/predict", json=body)
        return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

    async def forty() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(one(client) for _ in range(40)))

    answers = asyncio.run(forty())
    assert {status for status, *_ in answers} == {200, 503}  # the test server allows 24 pending
    refused = [(waited, retry_after) for status, waited, retry_after in answers if status == 503]
    assert all(retry_after == "2" and waited < 5.0 for waited, retry_after in refused)
    assert predict(server, PROMPT).status_code == 200


def test_hundreds_of_concurrent_predicts_all_reach_the_deployment_on_the_first_try(server: Server) -> None:
    # BentoML's own client renewed its connection pool every 100 requests, breaking the calls in
    # flight on it; sheaf's client keeps its connections, so not one call here should need the retry.
    logged_before = len(server.log_text())

    bodies = [{"model_type": "time_series", "history": [float(i), 1.0, 2.0, 3.0], "horizon": 2} for i in range(320)]
    responses = predict_at_once(server, "forecast", bodies, timeout=120, connections=32)
    assert [response.status_code for response in responses] == [200] * 320
    assert "failed upstream" not in server.log_text()[logged_before:]


def test_a_predict_past_its_deadline_is_504_and_its_model_work_stops(server: Server) -> None:
    started = time.perf_counter()
    body = {**PROMPT, "request_id": "late-predict", "max_new_tokens": 20000, "timeout_s": 1}
    response = predict(server, body)
    assert response.status_code == 504
    assert "deadline of 1 s" in response.json()["detail"]
    assert time.perf_counter() - started < 5
    # The deployment logs the request once its batch returns: only when generation stopped.
    deadline = time.monotonic() + 10
    while "textgen predict request_id=late-predict status=504" not in server.log_text():
        assert time.monotonic() < deadline, "the model went on generating past the deadline"
        time.sleep(0.2)


def test_a_stream_past_its_deadline_ends_with_an_error_event_and_stops(server: Server) -> None:
    started = time.perf_counter()
    events = stream_events(server, {**PROMPT, "request_id": "late-stream", "max_new_tokens": 20000, "timeout_s": 1})
    assert time.perf_counter() - started < 5
    assert {event["type"] for event in events[:-1]} == {"token"}
    assert events[-1] == {
        "type": "error",
        "done": True,
        "error": "no result within the deadline of 1 s",
        "code": "deadline_exceeded",
    }
    deadline = time.monotonic() + 10
    while not (stopped := re.search(r"stream late-stream cancelled after (\d+) tokens", server.log_text())):
        assert time.monotonic() < deadline, "the model went on generating past the deadline"
        time.sleep(0.2)
    assert int(stopped.group(1)) < 20000
    assert "textgen stream request_id=late-stream events=" in server.log_text()


def test_a_request_cannot_ask_for_more_time_than_its_deployment_gives() -> None:
    from sheaf.config import DeploymentConfig

    config = DeploymentConfig.model_validate({"name": "t", "model": {"hub": "x"}, "timeout_s": 30})
    assert config.timeout_for(5) == 5
    assert config.timeout_for(500) == 30
    assert config.timeout_for(None) == 30
    assert config.timeout_for(5, None, 12) == 30  # a batch runs until its last caller's deadline
    assert config.timeout_for(5, 12) == 12


def test_a_quiet_started_stream_gets_heartbeats_that_clients_skip(server: Server) -> None:
    body = {**PROMPT, "model_name": "slow-stream", "max_new_tokens": 3}  # a second between events
    with httpx.stream("POST", f"{server.url}/textgen/stream", json=body, timeout=60) as response:
        wire = response.read().decode()
    frames = wire.split("\n\n")[:-1]
    # Nothing before the stream passed its checks (until then it may still be an HTTP error), then it says so.
    assert frames[0] == ": accepted"
    assert frames.count(": heartbeat") >= 4  # the test server beats every 0.3 s
    assert SSEDecoder().feed(wire)[-1]["type"] == "result"
    with SheafClient(server.url) as client:
        events = list(client.stream("textgen", TextGenerationRequest(**body)))
    assert isinstance(events[-1], ResultEvent)


@pytest.mark.parametrize("name", ["textgen", "flux", "whisper", "forecast"])
def test_a_64_mb_body_is_413(server: Server, name: str) -> None:
    body = b'{"prompt": "' + b"x" * (64 * 1024 * 1024) + b'"}'
    response = httpx.post(
        f"{server.url}/{name}/predict", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413


def silence_b64(seconds: float) -> str:
    """A WAV of silence, 16 kHz mono."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\0\0" * int(16000 * seconds))
    return base64.b64encode(out.getvalue()).decode()


FOX = {"model_type": "diffusion", "prompt": "a fox"}
FIELD_LIMITS = {
    "prompt length": ("textgen", {**PROMPT, "prompt": "the river flows " * 40000}, "prompt"),
    "tokens": ("textgen", {**PROMPT, "max_new_tokens": 30001}, "max_new_tokens"),
    "diffusion prompt length": ("flux", {**FOX, "prompt": "a red fox " * 400}, "prompt"),
    "image size": ("flux", {**FOX, "height": 2048, "width": 2048}, "height"),
    "steps": ("flux", {**FOX, "num_inference_steps": 201}, "num_inference_steps"),
    "audio duration": ("whisper", {"model_type": "audio", "audio_b64": silence_b64(31)}, "audio_b64"),
    "horizon": ("forecast", {"model_type": "time_series", "history": [1.0] * 32, "horizon": 5000}, "horizon"),
    "history length": ("forecast", {"model_type": "time_series", "history": [1.0] * 20000, "horizon": 4}, "history"),
}


@pytest.mark.parametrize("route", ["predict", "stream"])
@pytest.mark.parametrize("case", FIELD_LIMITS)
def test_each_field_limit_is_a_422_naming_the_field(server: Server, route: str, case: str) -> None:
    name, body, field = FIELD_LIMITS[case]
    response = httpx.post(f"{server.url}/{name}/{route}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
