"""The text_generation contract: defaults and validation."""

import pytest
from pydantic import ValidationError

from sheaf.api import TextGenerationRequest, TextGenerationResponse


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
