"""Request bodies within a deployment's `max_body_mb`, read as JSON whatever their content type."""

from __future__ import annotations

import pydantic_core
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sheaf.asgi import send_json


class RequestBodies:
    """What reaches a deployment's routes is JSON within its `max_body_mb`.

    - 413 for a body over the limit, declared or chunked, before anything reads it;
    - any content type is read as JSON (BentoML would otherwise try multipart forms and fail
      with 500), except on the `forms` paths, whose routes read multipart forms themselves;
    - a `/batch` body that is not JSON is a 422 here: BentoML parses list bodies with
      `json.loads` and answers its errors (bad bytes, deep nesting, huge numbers) with 500.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], forms: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limits = limits
        self.forms = forms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        too_large = {"detail": f"request body is larger than this deployment's limit of {limit} bytes"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json(send, 413, too_large)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await send_json(send, 413, too_large)
                return
            if not message.get("more_body"):
                break
        if scope["path"].endswith("/batch"):
            try:
                pydantic_core.from_json(body)
            except ValueError as exc:
                detail = [{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}]
                await send_json(send, 422, {"detail": detail})
                return
        kept = (b"content-length",) if scope["path"] in self.forms else (b"content-type", b"content-length")
        headers = [(k, v) for k, v in scope["headers"] if k not in kept]
        if scope["path"] not in self.forms:
            headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)
