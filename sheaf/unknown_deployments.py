"""A contract route of a deployment that does not exist: a JSON 404 naming the ones that do."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from sheaf.asgi import send_json

CONTRACT_ROUTES = frozenset({"predict", "stream", "batch", "health", "ready", "jobs"})


class UnknownDeployments:
    """A contract route of a deployment that does not exist is a JSON 404 naming the ones that do."""

    def __init__(self, app: ASGIApp, deployments: list[str]) -> None:
        self.app = app
        self.deployments = sorted(deployments)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            parts = scope["path"].strip("/").split("/")
            if len(parts) >= 2 and parts[1] in CONTRACT_ROUTES and parts[0] not in self.deployments:
                detail = f"no deployment named {parts[0]!r}; these exist: {', '.join(self.deployments)}"
                await send_json(send, 404, {"detail": detail, "deployments": self.deployments})
                return
        await self.app(scope, receive, send)
