"""An API key on the entry service: `Authorization: Bearer KEY` on every route.

The key comes from the environment variable that `auth.api_key_env` in `sheaf.yaml` names
(`SHEAF_API_KEY` by default). Unset, every route is open, as `make serve` on 127.0.0.1
wants; `auth.required: true` makes start-up refuse instead. Probes and `/metrics` can stay
open (`open_probes`, `open_metrics`) for orchestrators and scrapers that carry no key.

Everything else without the right key is a 401, unknown paths included: a 404 would tell
a caller without a key which deployments exist.
"""

import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sheaf.asgi import send_json
from sheaf.config import Auth, ConfigError

# BentoML's own probes; each deployment adds `/{name}/health` and `/{name}/ready`.
SYSTEM_PROBES = ("/livez", "/readyz", "/healthz")
METRICS = "/metrics"


def api_key(auth: Auth, source: str = "sheaf.yaml") -> str | None:
    """The key from the environment, or None when none is asked; `ConfigError` when one is
    required and unset. `source` names the file that asked for it."""
    key = os.environ.get(auth.api_key_env, "").strip()
    if key:
        return key
    if auth.required:
        raise ConfigError(
            f"{source}: auth.required is true but {auth.api_key_env} is unset or empty: set it to the API key"
        )
    return None


def open_paths(auth: Auth, deployments: Iterable[str]) -> frozenset[str]:
    """The exact paths that answer without the key, per `auth.open_probes` and `auth.open_metrics`."""
    paths: set[str] = set()
    if auth.open_probes:
        paths.update(SYSTEM_PROBES)
        paths.update(f"/{name}/{probe}" for name in deployments for probe in ("health", "ready"))
    if auth.open_metrics:
        paths.add(METRICS)
    return frozenset(paths)


class APIKey:
    """Answer 401 to any request without `Authorization: Bearer <key>`, except on `open_paths`."""

    def __init__(self, app: ASGIApp, key: str, open_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.expected = hashlib.sha256(key.encode()).digest()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _authorization(scope["headers"])
        if given is not None and self._matches(given):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        await _unauthorized(send, wrong=given is not None)

    def _matches(self, given: bytes) -> bool:
        # The scheme is case-insensitive (RFC 7235). The key is compared as a digest, in
        # constant time: neither its content nor its length shows in the time to answer.
        scheme, _, token = given.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self.expected) and scheme.lower() == b"bearer"


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            return value.strip()
    return None


async def _unauthorized(send: Send, *, wrong: bool) -> None:
    body: dict[str, Any] = {
        "detail": "invalid API key" if wrong else "missing API key: send `Authorization: Bearer <key>`"
    }
    challenge = b'Bearer error="invalid_token"' if wrong else b"Bearer"
    await send_json(send, 401, body, [(b"www-authenticate", challenge)])
