"""BentoML's 400 for a body that fails validation, answered as the contract's 422 `{"detail": [...]}`."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ValidationErrorsAs422:
    """Answer BentoML's 400 for a body that fails validation as the contract's 422 `{"detail": [...]}`,
    on the contract's routes (`paths`; the OpenAI routes answer their own 400s)."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = b""

        async def send_rewritten(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] == 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            content = json.dumps({"detail": _validation_detail(body)}).encode()
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(content)).encode()))
            await send({**held, "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, send_rewritten)


def _validation_detail(body: bytes) -> Any:
    """Pydantic's errors without the doc links, with `body` first in each location as FastAPI does."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
    if not isinstance(payload, dict) or not isinstance(payload.get("detail"), list):
        return payload.get("error", payload) if isinstance(payload, dict) else payload
    return [
        {
            "loc": ["body", *_without_root(error.get("loc", []))],
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in payload["detail"]
    ]


def _without_root(loc: list[Any]) -> list[Any]:
    """BentoML wraps a list body in a model whose one field is `root`; the caller never saw it."""
    return loc[1:] if loc[:1] == ["root"] else loc
