"""docs/wire-contract.md stays in step with the code: every field, route and event it must name."""

import re
from pathlib import Path
from typing import Any

import pytest

from sheaf.api import DiffusionRequest, ForecastRequest, TextGenerationRequest, TranscriptionRequest
from sheaf.api.base import BaseRequest
from sheaf.api.events import PROGRESS_EVENTS
from sheaf.config import load_config
from sheaf.job_routes import job_routes
from sheaf.job_store import SQLiteJobStore
from sheaf.jobs import JobBoard
from sheaf.unknown_deployments import CONTRACT_ROUTES

ROOT = Path(__file__).resolve().parent.parent

CONTRACT = (ROOT / "docs" / "wire-contract.md").read_text()


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


def route_rows() -> set[str]:
    """The routes the contract's table has a row for, as `METHOD /path`."""
    return set(re.findall(r"^\| `([A-Z]+ /\S+)` \|", CONTRACT, flags=re.MULTILINE))


def test_every_job_route_has_its_row(tmp_path: Path) -> None:
    """`POST /{name}/jobs` (a BentoML API of the gateway), then each route the job board serves."""
    board = JobBoard(SQLiteJobStore(tmp_path / "jobs.sqlite3"), ttl_s=60)  # opens nothing until used
    config = load_config(ROOT / "configs" / "textgen.yaml")
    board.serve(config, open_stream=lambda _: None, check=lambda _: None)  # type: ignore[arg-type,return-value]
    served = {
        f"{method} {route.path.replace('/textgen/', '/{name}/').replace('{job_id}', '{id}')}"
        for route in job_routes(board)
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert served == {"GET /{name}/jobs/{id}", "GET /{name}/jobs/{id}/events", "DELETE /{name}/jobs/{id}"}
    missing = sorted({"POST /{name}/jobs", *served} - route_rows())
    assert not missing, f"docs/wire-contract.md has no row for {missing}"


def test_a_jobs_own_events_are_named() -> None:
    for event in ("queued", "cancelled"):
        assert f"| `{event}` |" in CONTRACT
