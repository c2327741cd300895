"""docs/wire-contract.md stays in step with the code: every field, route and event it must name."""

import re
from pathlib import Path
from typing import Any

import pytest

from sheaf.api import DiffusionRequest, ForecastRequest, TextGenerationRequest, TranscriptionRequest
from sheaf.api.base import BaseRequest
from sheaf.api.events import PROGRESS_EVENTS
from sheaf.unknown_deployments import CONTRACT_ROUTES

CONTRACT = (Path(__file__).resolve().parent.parent / "docs" / "wire-contract.md").read_text()


def contract_row(model_type: str) -> str:
    (row,) = [line for line in CONTRACT.splitlines() if line.startswith(f"| `{model_type}` |")]
    return row


@pytest.mark.parametrize("model", [DiffusionRequest, TranscriptionRequest, TextGenerationRequest, ForecastRequest])
def test_every_request_field_is_in_its_contract_row(model: type[BaseRequest[Any]]) -> None:
    row = contract_row(model.model_fields["model_type"].default)
    common = set(BaseRequest.model_fields)
    missing = [f for f in model.model_fields if f not in common and f"`{f}`" not in row]
    assert not missing, f"docs/wire-contract.md does not name {missing}"
    response = model.response_model
    missing = [f for f in response.model_fields if f not in common | {"metadata"} and f"`{f}`" not in row]
    assert not missing, f"docs/wire-contract.md does not name the response fields {missing}"


def test_the_common_fields_routes_and_events_are_named() -> None:
    for field in BaseRequest.model_fields:
        assert f"`{field}`" in CONTRACT
    for route in CONTRACT_ROUTES:
        assert re.search(rf"`(POST|GET) /\{{name\}}/{route}`", CONTRACT), route
    for event in [*PROGRESS_EVENTS, "result", "error"]:
        assert f"| `{event}` |" in CONTRACT
