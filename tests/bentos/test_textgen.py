"""The textgen deployment end to end: a real server, the real backend on a tiny Llama."""

from typing import Any

import httpx
import pytest

from sheaf.api import TextGenerationRequest
from tests.conftest import Server, predict_at_once, stream_events

pytestmark = pytest.mark.together_and_apart  # the contract holds with the deployments served apart too

BASE = {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 8}
HUGE = "the river flows " * 56_000  # 896,000 characters: within the 1 MB body limit, far over what 32k tokens hold


def post(server: Server, route: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/textgen/{route}", json=body, timeout=60)


def stream(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    return stream_events(server, "textgen", body)


def refused_fields(response: httpx.Response) -> list[str]:
    """The fields a 422 names (the first place of each error's location under `body`)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    return [error["loc"][1] for error in response.json()["detail"]]


REFUSED = {
    "seed of 2^64": ({**BASE, "seed": 2**64}, "seed"),
    "seed of 2^63": ({**BASE, "seed": 2**63}, "seed"),
    "17 stop strings": ({**BASE, "stop": [f"stop {i}" for i in range(17)]}, "stop"),
    "a stop string of 257 characters": ({**BASE, "stop": ["x" * 257]}, "stop"),
    "a prompt no context holds": ({**BASE, "prompt": HUGE}, "prompt"),
    "messages no context holds": (
        {"model_type": "text_generation", "messages": [{"role": "user", "content": HUGE}]},
        "messages",
    ),
    "empty messages": ({"model_type": "text_generation", "messages": []}, "messages"),
}


@pytest.mark.parametrize("route", ["predict", "stream"])
@pytest.mark.parametrize("case", REFUSED)
def test_out_of_bounds_requests_are_a_422_naming_the_field(server: Server, route: str, case: str) -> None:
    body, field = REFUSED[case]
    assert refused_fields(post(server, route, body)) == [field]


def test_a_huge_prompt_is_refused_by_its_length_in_characters(server: Server) -> None:
    (error,) = post(server, "predict", {**BASE, "prompt": HUGE}).json()["detail"]
    assert error["msg"].startswith(f"is {len(HUGE)} characters;")
    (error,) = post(server, "predict", {"model_type": "text_generation", "messages": []}).json()["detail"]
    assert "empty" in error["msg"] and "exactly one" not in error["msg"]


def test_a_huge_seed_fails_alone_among_concurrent_predicts(server: Server) -> None:
    bodies: list[dict[str, Any]] = [
        {**BASE, "prompt": f"story {i} begins", "temperature": 0.8, "seed": i, "request_id": f"seed-{i}"}
        for i in range(7)
    ]
    bodies[3]["seed"] = 2**64
    mates = [0, 1, 2, 4, 5, 6]
    alone = {i: post(server, "predict", bodies[i]).json()["text"] for i in mates}

    responses = predict_at_once(server, "textgen", bodies)
    assert [r.status_code for r in responses] == [200, 200, 200, 422, 200, 200, 200]
    assert refused_fields(responses[3]) == ["seed"]
    assert {i: responses[i].json()["text"] for i in mates} == alone
    assert max(responses[i].json()["metadata"]["batch_size"] for i in mates) > 1


def test_the_largest_seed_and_stop_list_are_served(server: Server) -> None:
    body = {**BASE, "temperature": 1.0, "seed": 2**63 - 1, "stop": [f"{i:02d}" + "z" * 254 for i in range(16)]}
    predicted = post(server, "predict", body)
    assert predicted.status_code == 200, predicted.text
    assert stream(server, body)[-1]["text"] == predicted.json()["text"]


def test_the_documented_example_body_is_a_valid_request(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    for route in ("predict", "stream"):
        schema = spec["paths"][f"/textgen/{route}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        example = schema["example"]  # what Swagger's "Try it out" fills the body with
        request = TextGenerationRequest.model_validate(example)
        assert request.prompt is None and request.messages
        if route == "predict":
            answer = post(server, route, example)
            assert answer.status_code == 200, answer.text
            assert answer.json()["completion_tokens"] > 0
        else:
            assert stream(server, example)[-1]["type"] == "result"
    # /batch takes a list of the request component, which carries the same example.
    items = spec["paths"]["/textgen/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]["items"]
    example = spec["components"]["schemas"][items["$ref"].removeprefix("#/components/schemas/")]["example"]
    TextGenerationRequest.model_validate(example)
    (outcome,) = post(server, "batch", [example]).json()
    assert outcome["status"] == 200, outcome
