"""The playground's Starlette app, mounted by the entry service at `/ui`.

It serves the page and its static files (shipped in the package: the page works offline) and
`/ui/deployments`, what each deployment takes, from which the page builds its forms. The page
itself calls the deployments' own routes (`/{name}/predict`, `/stream`, `/jobs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sheaf.gateway import Lane

STATIC = Path(__file__).parent / "static"


def describe(lane: Lane) -> dict[str, Any]:
    """What the page needs to know of one deployment: its request schema, adapters and limits."""
    config = lane.config
    options = config.options
    adapters = options.get("adapters") or []
    return {
        "name": lane.name,
        "model_type": lane.request_type.model_fields["model_type"].default,
        "schema": lane.request_type.model_json_schema(),
        "adapters": [adapter["name"] for adapter in adapters if isinstance(adapter, dict) and "name" in adapter],
        "default_adapters": list(options.get("default_adapters") or []),
        "limits": {
            **config.limits.model_dump(),
            "max_batch_size": config.batching.max_batch_size,
            "max_body_mb": config.max_body_mb,
            "timeout_s": config.timeout_s,
            # Backend limits such as `max_new_tokens_limit` or `max_audio_seconds`; plain values only.
            **{key: value for key, value in options.items() if isinstance(value, int | float | str | bool)},
        },
    }


def ui_app(lanes: Mapping[str, Lane]) -> Starlette:
    """`GET /ui/` the page, `/ui/static/...` its files, `/ui/deployments` the deployments (mount at `/ui`)."""
    described = [describe(lane) for lane in lanes.values()]

    async def page(request: Request) -> FileResponse:
        # No caching: a page from an older sheaf must not meet a newer server's deployments.
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def deployments(request: Request) -> JSONResponse:
        return JSONResponse({"deployments": described})

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/deployments", deployments, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
