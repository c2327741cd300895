"""The text_generation contract: defaults and validation."""

import pytest
from pydantic import ValidationError

from sheaf.api import TextGenerationRequest, TextGenerationResponse
from sheaf.api.base import BaseRequest


def test_defaults_and_a_fresh_request_id() -> None:
    first, second = TextGenerationRequest(prompt="hi"), TextGenerationRequest(prompt="hi")
    assert first.model_type == "text_generation"
    assert first.temperature == 0.0 and first.stop == [] and first.seed is None
    assert first.request_id != second.request_id
    assert TextGenerationRequest.response_model is TextGenerationResponse


def test_null_messages_mean_none_given() -> None:
    assert TextGenerationRequest.model_validate({"prompt": "hi", "messages": None}).messages == []


def test_unknown_fields_are_ignored() -> None:
    assert not hasattr(TextGenerationRequest.model_validate({"prompt": "hi", "extra": 1}), "extra")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {"messages": []},
        {"prompt": "hi", "stop": [""]},
        {"prompt": "hi", "model_type": "diffusion"},
        {"prompt": "hi", "max_new_tokens": 0},
        {"prompt": "hi", "top_p": 0},
        {"messages": [{"role": "robot", "content": "hi"}]},
    ],
)
def test_invalid_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TextGenerationRequest.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "hi", "seed": 2**63}, "seed"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "stop": [f"stop {i}" for i in range(17)]}, "stop"),
        ({"prompt": "hi", "stop": ["x" * 257]}, "stop"),
    ],
)
def test_out_of_bounds_fields_are_refused_by_name(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        TextGenerationRequest.model_validate(fields)
    assert [error["loc"][0] for error in refused.value.errors()] == [field]


def test_the_largest_seed_and_stop_list_allowed_are_taken() -> None:
    stops = [f"{i:02d}" + "x" * 254 for i in range(16)]
    request = TextGenerationRequest(prompt="hi", seed=2**63 - 1, stop=stops)
    assert (request.seed, request.stop) == (2**63 - 1, stops)


def test_empty_messages_are_said_to_be_empty() -> None:
    with pytest.raises(ValidationError) as refused:
        TextGenerationRequest.model_validate({"messages": []})
    (error,) = refused.value.errors()
    assert error["loc"] == ("messages",)
    assert "empty" in error["msg"] and "exactly one" not in error["msg"]
    # Given along with a prompt, no messages is simply none given.
    assert TextGenerationRequest.model_validate({"prompt": "hi", "messages": []}).messages == []


def test_the_schema_example_is_a_valid_chat_request() -> None:
    example = TextGenerationRequest.model_json_schema()["example"]
    request = TextGenerationRequest.model_validate(example)
    assert request.prompt is None and request.messages


def test_the_example_comes_on_top_of_the_schema_hook_of_every_wire_request(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setitem(BaseRequest.model_config, "json_schema_extra", lambda schema: seen.append(schema["title"]))
    assert "example" in TextGenerationRequest.model_json_schema()
    assert seen == ["TextGenerationRequest"]
