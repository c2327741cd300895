"""sheaf's errors in OpenAI's shape."""

import pytest

from sheaf.openai_api.chat import RENAMES, ChatCompletionRequest
from sheaf.openai_api.errors import OpenAIError, from_sheaf


def test_a_422_naming_a_field_is_a_400_naming_the_openai_parameter() -> None:
    detail = [{"loc": ["body", "max_new_tokens"], "msg": "must be at most 30000", "type": "value_error"}]
    error = from_sheaf(422, {"detail": detail}, RENAMES)
    assert error.status == 400
    assert error.body() == {
        "error": {
            "message": "`max_tokens`: must be at most 30000",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "invalid_parameter",
        }
    }


def test_a_nested_location_reads_as_a_path() -> None:
    detail = [{"loc": ["body", "messages", 2, "content"], "msg": "too long", "type": "x"}]
    assert from_sheaf(422, {"detail": detail}, {}).param == "messages[2].content"


def test_a_full_deployment_stays_a_503_that_says_when_to_retry() -> None:
    error = from_sheaf(503, {"detail": "this deployment is full"}, {}, {"retry-after": "2"})
    assert (error.status, error.code, error.headers) == (503, "server_busy", {"retry-after": "2"})
    assert error.body()["error"]["type"] == "server_error"
    assert error.response().headers["retry-after"] == "2"


@pytest.mark.parametrize(
    ("body", "param"), [({"model": "m"}, "messages"), ({"messages": [], "model": "m"}, "messages")]
)
def test_an_invalid_openai_request_names_its_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(OpenAIError) as raised:
        ChatCompletionRequest.parse(body)
    assert raised.value.status == 400 and raised.value.param == param
