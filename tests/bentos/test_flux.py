"""The flux deployment end to end: a real server, the real backend on a tiny FLUX pipeline."""

import asyncio
import base64
import io
import json
import re
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from sheaf.streaming import SSEDecoder
from tests.conftest import Server, predict_at_once, stream_events

pytestmark = pytest.mark.together_and_apart  # the contract holds with the deployments served apart too

BASE = {"model_type": "diffusion", "prompt": "a red fox in snow", "height": 64, "width": 64, "num_inference_steps": 4}


def predict(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/flux/predict", json=body, timeout=120)


def stream(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    return stream_events(server, "flux", body)


def image(payload: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(payload["image_b64"])))


def concurrently(server: Server, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run predicts and streams at once; each gives its final payload (the response, or the result event)."""

    async def one(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if route == "predict":
            response = await client.post(f"{server.url}/flux/predict", json=body)
            assert response.status_code == 200, response.text
            return dict(response.json())
        decoder, events = SSEDecoder(), []
        async with client.stream("POST", f"{server.url}/flux/stream", json=body) as response:
            async for chunk in response.aiter_raw():
                events.extend(decoder.feed(chunk))
        assert events[-1]["type"] == "result", events[-1]
        return events[-1]

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, route, body) for route, body in calls))

    return asyncio.run(run())


def test_a_stream_reports_every_step_in_order_then_one_png(server: Server) -> None:
    events = stream(server, {**BASE, "num_inference_steps": 6, "height": 32, "width": 48, "seed": 3})
    *progress, result = events
    assert [(e["type"], e["step"], e["total_steps"], e["done"]) for e in progress] == [
        ("progress", step, 6, False) for step in range(1, 7)
    ]
    assert result["type"] == "result" and result["done"] is True
    assert result["seed"] == 3 and (result["height"], result["width"]) == (32, 48)
    assert image(result).format == "PNG"
    assert image(result).size == (48, 32)


def test_previews_come_every_nth_step_when_asked(server: Server) -> None:
    *progress, _ = stream(server, {**BASE, "num_inference_steps": 4, "preview_every": 2, "seed": 1})
    with_preview = [e["step"] for e in progress if e.get("preview_b64")]
    assert with_preview == [2, 4]
    assert Image.open(io.BytesIO(base64.b64decode(progress[1]["preview_b64"]))).format == "PNG"


def test_the_same_seed_gives_the_same_image_alone_streamed_and_batched(server: Server) -> None:
    body = {**BASE, "seed": 1234}
    alone = predict(server, body).json()
    streamed = stream(server, body)[-1]
    assert alone["seed"] == streamed["seed"] == 1234
    assert alone["image_b64"] == streamed["image_b64"]
    # The first request of a burst may run alone while the rest queue: send ours several times among others.
    others = [{**BASE, "seed": s} for s in (1, 2, 3)] + [{**BASE, "seed": 5, "height": 32}]
    calls = [("predict", body) for _ in range(3)] + [("predict", other) for other in others * 2]
    ours = concurrently(server, calls)[:3]
    assert {answer["image_b64"] for answer in ours} == {alone["image_b64"]}
    assert max(answer["metadata"]["batch_size"] for answer in ours) > 1


def test_the_server_picks_and_returns_a_seed(server: Server) -> None:
    first = predict(server, BASE).json()
    again = predict(server, {**BASE, "seed": first["seed"]}).json()
    assert again["image_b64"] == first["image_b64"]


SELECTIONS: dict[str, dict[str, Any]] = {
    "none": {"adapters": []},
    "a": {"adapters": ["a"]},
    "b": {"adapters": ["b"]},
    "a+b": {"adapters": ["a", "b"], "adapter_weights": [0.7, 0.3]},
}


def test_adapters_never_bleed_into_other_requests(server: Server) -> None:
    bodies = {name: {**BASE, "seed": 42, **fields} for name, fields in SELECTIONS.items()}
    alone = {name: predict(server, body).json()["image_b64"] for name, body in bodies.items()}
    assert len(set(alone.values())) == 4  # each selection draws its own image

    calls = [(route, bodies[name]) for _ in range(3) for name in bodies for route in ("predict", "stream")]
    answers = concurrently(server, calls)
    expected = [alone[name] for _ in range(3) for name in bodies for _route in ("predict", "stream")]
    assert [answer["image_b64"] for answer in answers] == expected


def test_no_adapters_never_inherits_the_last_selection(server: Server) -> None:
    plain = predict(server, {**BASE, "seed": 9, "adapters": []}).json()["image_b64"]
    predict(server, {**BASE, "seed": 9, "adapters": ["a"]})
    assert predict(server, {**BASE, "seed": 9, "adapters": []}).json()["image_b64"] == plain


def test_unknown_adapters_and_mismatched_weights_are_422_before_any_event(server: Server) -> None:
    for body, field in [
        ({**BASE, "adapters": ["nope"]}, "adapters"),
        ({**BASE, "adapters": ["a"], "adapter_weights": [0.5, 0.5]}, "adapter_weights"),
        ({**BASE, "height": 30}, "height"),
        ({**BASE, "prompt": "   "}, "prompt"),
        ({**BASE, "num_inference_steps": 0}, "num_inference_steps"),
    ]:
        for route in ("predict", "stream"):
            response = httpx.post(f"{server.url}/flux/{route}", json=body, timeout=30)
            assert response.status_code == 422, (route, body, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert field in response.text


def test_a_request_that_fails_or_is_refused_late_fails_alone_in_its_batch(server: Server) -> None:
    bodies = [{**BASE, "seed": 30 + i, "request_id": f"iso-flux-{i}"} for i in range(7)]
    bodies[2]["model_name"] = "fail-in-batch"  # the model runs it with the rest, then it fails
    bodies[3]["adapters"] = ["nope"]  # valid JSON; only the backend knows which adapters it has
    bodies[5] |= {"height": 2048, "width": 2048}  # within the contract, over the deployment's max_pixels
    mates = [0, 1, 4, 6]
    alone = {i: predict(server, bodies[i]).json()["image_b64"] for i in mates}

    responses = predict_at_once(server, "flux", bodies, timeout=300)
    assert [r.status_code for r in responses] == [200, 200, 500, 422, 200, 422, 200]
    assert responses[2].json() == {"detail": "InjectedFault: injected for this request"}
    assert [responses[i].json()["detail"][0]["loc"] for i in (3, 5)] == [["body", "adapters"], ["body", "height"]]
    assert {i: responses[i].json()["image_b64"] for i in mates} == alone  # the same images as alone
    assert max(responses[i].json()["metadata"]["batch_size"] for i in mates) > 1


def test_a_dropped_stream_stops_denoising_and_the_queued_request_runs(server: Server) -> None:
    queued: list[httpx.Response] = []
    body = {**BASE, "num_inference_steps": 200, "seed": 5, "request_id": "dropped-flux"}
    with httpx.stream("POST", f"{server.url}/flux/stream", json=body, timeout=120) as response:
        decoder, received = SSEDecoder(), 0
        waiter = threading.Thread(target=lambda: queued.append(predict(server, {**BASE, "seed": 6})))
        for chunk in response.iter_raw():
            received += len(decoder.feed(chunk))
            if received and waiter.ident is None:  # the stream holds the pipeline now: this predict queues behind it
                waiter.start()
            if received >= 2:  # events that waited together come in one write: the first chunk may hold both
                break
    waiter.join(60)
    assert queued and queued[0].status_code == 200
    deadline = time.monotonic() + 30
    while not (match := re.search(r"stream dropped-flux cancelled after (\d+) steps", server.log_text())):
        assert time.monotonic() < deadline, "the pipeline never stopped"
        time.sleep(0.1)
    assert int(match.group(1)) < 200
    assert re.search(r"flux stream request_id=dropped-flux events=\d+ outcome=cancelled", server.log_text())


def test_a_failure_after_the_first_event_ends_the_stream_with_an_error_event(server: Server) -> None:
    events = stream(server, {**BASE, "model_name": "fail-mid-stream"})
    assert [event["type"] for event in events] == ["progress", "progress", "error"]
    assert events[-1]["error"] == "InjectedFault: injected after two events"
    assert predict(server, BASE).status_code == 200


@pytest.mark.parametrize("route", ["predict", "stream"])
@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e308", "-10.5"])
def test_adapter_weights_that_are_not_finite_or_past_10_are_422(server: Server, route: str, weight: str) -> None:
    # As BaseRequest writes them, and as a client's JSON library may: NaN and Infinity as bare literals.
    raw = json.dumps({**BASE, "adapters": ["a"]})[:-1] + f', "adapter_weights": [{weight}]}}'
    response = httpx.post(
        f"{server.url}/flux/{route}", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "adapter_weights", 0]]


def test_a_huge_prompt_is_a_quick_422(server: Server) -> None:
    huge = "a red fox in the snow " * 100_000  # 2.2 MB
    for route in ("predict", "stream"):
        response = httpx.post(f"{server.url}/flux/{route}", json={**BASE, "prompt": huge}, timeout=30)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
        assert "at most 512 tokens" in response.json()["detail"][0]["msg"]


def test_sixteen_predicts_with_random_selections_share_calls_without_bleed(together_server: Server) -> None:
    """Mixed adapter batches (the default): selections share pipeline calls, and the pipeline's own
    adapter selection never changes (no swap)."""
    from tests.test_metrics import samples, value

    server = together_server
    names = list(SELECTIONS)
    chosen = [names[(i * 7 + 3) % len(names)] for i in range(16)]  # every selection, in a scrambled order
    bodies = [{**BASE, "seed": 100 + i, **SELECTIONS[name]} for i, name in enumerate(chosen)]
    alone = [predict(server, body).json()["image_b64"] for body in bodies]
    swaps = value(samples(server), "sheaf_adapter_swaps_total", deployment="flux")
    responses = predict_at_once(server, "flux", bodies)
    assert [r.status_code for r in responses] == [200] * 16
    answers = [r.json() for r in responses]
    assert [answer["image_b64"] for answer in answers] == alone  # each its own image: no bleed
    # One call's members share its batch size and time; fewer calls than selections were sent.
    calls: dict[tuple[int, float], set[str]] = {}
    for answer, name in zip(answers, chosen, strict=True):
        calls.setdefault((answer["metadata"]["batch_size"], answer["metadata"]["inference_ms"]), set()).add(name)
    assert len(calls) < len(set(chosen))
    assert max(len(selections) for selections in calls.values()) > 1
    assert value(samples(server), "sheaf_adapter_swaps_total", deployment="flux") == swaps
