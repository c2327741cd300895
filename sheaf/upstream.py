"""How the entry service reaches a deployment's process: its own HTTP clients, one pair per deployment.

`bentoml.depends` still declares the deployments (BentoML starts them and says where they
listen), but the calls go through these clients:

- aiohttp, with the requests encoded once by pydantic. BentoML's dependency proxy re-encodes
  every request through its own serde layers, which cost more than the HTTP, and it renews its
  connection pool every 100 calls by closing the old one, breaking the calls in flight on it.
- streams too: BentoML's proxy never closes a stream response its caller abandons, so the
  deployment would go on generating for a client that is gone; closing our own response
  closes the connection, and the deployment's stream is cancelled. (httpx did the same at
  about twice the CPU per stream.)
"""

import codecs
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlparse

import aiohttp
import bentoml
from pydantic import BaseModel

from sheaf.outcomes import OUTCOME_STATUS, Outcome

CONNECT_TIMEOUT_S = 10
READY_TIMEOUT_S = 5
ALIVE_TIMEOUT_S = 2
KEEPALIVE_S = 3.0
JSON_HEADERS = {"content-type": "application/json"}


class UpstreamError(Exception):
    """The deployment answered with an HTTP error of its own."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail

    @property
    def body(self) -> dict[str, Any]:
        """The deployment's JSON error body, or the text as `detail`."""
        try:
            body = json.loads(self.detail)
        except ValueError:
            return {"detail": self.detail}
        return body if isinstance(body, dict) else {"detail": body}


_sessions: dict[str, aiohttp.ClientSession] = {}
_fresh_sessions: dict[str, aiohttp.ClientSession] = {}


def _address(deployment: bentoml.Service[Any]) -> tuple[str, str | None]:
    """The base URL to send to, and the Unix socket to send it through (local serving uses one)."""
    url = deployment.url
    if url is None:
        raise RuntimeError(f"deployment {deployment.name} is not being served")
    if url.startswith("file://"):
        return "http://deployment", urlparse(url).path
    return url, None


def _session(deployment: bentoml.Service[Any], fresh: bool = False) -> aiohttp.ClientSession:
    """The deployment's pooled session; `fresh`: one whose every call opens a new connection (a
    retry after a broken one: when a replica dies, the pool may hold more connections to it)."""
    sessions = _fresh_sessions if fresh else _sessions
    session = sessions.get(deployment.name)
    if session is None or session.closed:
        base, socket = _address(deployment)
        # Idle connections go before the deployment's keep-alive (uvicorn's 5 s) closes them under a call.
        options: dict[str, Any] = (
            {"limit": 0, "force_close": True} if fresh else {"limit": 0, "keepalive_timeout": KEEPALIVE_S}
        )
        connector = aiohttp.UnixConnector(path=socket, **options) if socket else aiohttp.TCPConnector(**options)
        session = sessions[deployment.name] = aiohttp.ClientSession(base, connector=connector)
    return session


async def _call(deployment: bentoml.Service[Any], api: str, body: bytes, timeout_s: float, fresh: bool = False) -> Any:
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
    async with _session(deployment, fresh).post(
        f"/{api}", data=body, headers=JSON_HEADERS, timeout=timeout
    ) as response:
        if response.status != 200:
            raise UpstreamError(response.status, (await response.text())[:500])
        return await response.json(content_type=None)


class Answer(NamedTuple):
    """A deployment's answer to one predict, to relay as it is: its status and its JSON body."""

    status: int
    body: bytes


async def predict(
    deployment: bentoml.Service[Any], request: BaseModel, timeout_s: float, fresh: bool = False
) -> Answer:
    """The deployment's `predict` answer for `request` (`fresh`: over a new connection)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
    body = _body("request", request)
    async with _session(deployment, fresh).post(
        "/predict", data=body, headers=JSON_HEADERS, timeout=timeout
    ) as response:
        if response.status != 200:
            raise UpstreamError(response.status, (await response.text())[:500])
        return Answer(int(response.headers[OUTCOME_STATUS]), await response.read())


async def batch(
    deployment: bentoml.Service[Any], requests: Sequence[BaseModel], timeout_s: float, fresh: bool = False
) -> list[Outcome]:
    """The deployment's `batch` outcomes for `requests`, in order, from one model call."""
    body = b'{"requests":[' + b",".join(request.model_dump_json().encode() for request in requests) + b"]}"
    outcomes: list[Outcome] = await _call(deployment, "batch", body, timeout_s, fresh)
    return outcomes


def _body(field: str, request: BaseModel) -> bytes:
    return b'{"' + field.encode() + b'":' + request.model_dump_json().encode() + b"}"


async def check(deployment: bentoml.Service[Any], request: BaseModel) -> Outcome:
    """The deployment's `check` outcome for `request`: what it would be refused for, or 200."""
    outcome: Outcome = await _call(deployment, "check", _body("request", request), READY_TIMEOUT_S)
    return outcome


async def ready(deployment: bentoml.Service[Any]) -> Outcome:
    """The deployment's `ready` outcome."""
    outcome: Outcome = await _call(deployment, "ready", b"{}", READY_TIMEOUT_S)
    return outcome


async def alive(deployment: bentoml.Service[Any]) -> None:
    """Return when the deployment's process answers HTTP at all (loaded or not) within ALIVE_TIMEOUT_S."""
    timeout = aiohttp.ClientTimeout(total=ALIVE_TIMEOUT_S)
    async with _session(deployment).get("/livez", timeout=timeout) as response:
        await response.read()


async def stream(deployment: bentoml.Service[Any], request: BaseModel) -> AsyncGenerator[str, None]:
    """The deployment's `stream` API as text chunks, as they arrive. Leaving before the end closes
    the connection, which cancels the deployment's stream."""
    # No total: a stream lasts as long as its deadline, which the entry service enforces itself.
    read_s = deployment.config.get("traffic", {}).get("timeout") or 300
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=read_s)
    body = _body("request", request)
    async with _session(deployment).post("/stream", data=body, headers=JSON_HEADERS, timeout=timeout) as response:
        if response.status != 200:
            raise UpstreamError(response.status, (await response.text())[:500])
        text = codecs.getincrementaldecoder("utf-8")()  # a chunk may end inside a character
        try:
            async for chunk in response.content.iter_any():
                yield text.decode(chunk)
        finally:
            if not response.content.at_eof():  # abandoned: never hand this connection back to the pool
                response.close()
