"""Clients that stall a request: raw sockets against a real server (a forecast deployment on a tiny TimesFM).

The entry service closes a connection whose headers are not complete within 10 s of its
start, or whose body is not complete within 30 s of its headers (a 408 when nothing was
answered yet); in the meantime it serves everyone else.
"""

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Server, serve

HEADER_TIMEOUT_S = 10.0  # the defaults
BODY_TIMEOUT_S = 30.0
SLACK_S = 5.0  # for a loaded machine: the bound plus this is when a test gives up
FORECAST = 'name: forecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\n'
BODY = b'{"model_type": "time_series", "history": [1, 2, 3, 4, 5, 6, 7, 8], "horizon": 2}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("slow-clients")
    (root / "configs").mkdir()
    (root / "configs" / "forecast.yaml").write_text(FORECAST)
    yield from serve(
        root / "configs", root / "server.log", env={"SHEAF_CACHE_DIR": str(root / "cache")}, ready=("forecast",)
    )


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def predict(body: bytes = BODY, *, length: int | None = None) -> bytes:
    return (
        b"POST /forecast/predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        + b"content-length: %d\r\n\r\n" % (len(body) if length is None else length)
        + body
    )


def held(server: Server, *parts: bytes, bound: float) -> tuple[float, bytes]:
    """Send `parts` and stall: the seconds until the server closes the connection, and all it answered.

    Fails past `bound` + `SLACK_S` with the connection still open."""
    with socket.create_connection(address(server)) as sock:
        for index, part in enumerate(parts):
            time.sleep(1 if index else 0)  # a later part goes after the answer to the one before
            sock.sendall(part)
        start = time.monotonic()
        sock.settimeout(bound + SLACK_S)
        answered = b""
        try:
            while chunk := sock.recv(65536):
                answered += chunk
        except TimeoutError:
            pytest.fail(f"still open {bound + SLACK_S:g} s after stalling; answered {answered[:200]!r}")
        except ConnectionResetError:
            pass
        return time.monotonic() - start, answered


HEAD = b"POST /forecast/predict HTTP/1.1\r\nhost: 127.0.0.1\r\n"
SECOND = b"GET /forecast/health HTTP/1.1\r\nhost: 127"
# What a client sends before it stalls, the bound that applies, and the statuses of the answers it gets.
STALLS: dict[str, tuple[list[bytes], float, list[bytes]]] = {
    "nothing": ([], HEADER_TIMEOUT_S, []),
    "headers": ([HEAD + b"content-le"], HEADER_TIMEOUT_S, [b"408"]),
    "headers of a second request": ([predict(), SECOND], HEADER_TIMEOUT_S, [b"200", b"408"]),
    "body": ([predict(BODY[:20], length=len(BODY))], BODY_TIMEOUT_S, [b"408"]),
    "chunked body": (
        [HEAD + b"transfer-encoding: chunked\r\n\r\na\r\n" + BODY[:10] + b"\r\n"],
        BODY_TIMEOUT_S,
        [b"408"],
    ),
    "body of a route that does not read it": (
        [b"GET /livez HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{"],
        BODY_TIMEOUT_S,
        [b"200"],
    ),
}


def test_stalled_requests_are_closed_within_their_bound_and_others_are_served(server: Server) -> None:
    """Every stall at once (the longest bound is the test's length), and a normal client meanwhile."""
    with ThreadPoolExecutor(len(STALLS)) as pool:
        outcomes = {name: pool.submit(held, server, *parts, bound=bound) for name, (parts, bound, _) in STALLS.items()}
        time.sleep(1)  # every stall is in place
        with httpx.Client(base_url=server.url, timeout=10) as client:
            started = time.monotonic()
            response = client.post("/forecast/predict", content=BODY, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 5
        results = {name: outcome.result() for name, outcome in outcomes.items()}
    for name, (seconds, answered) in results.items():
        _, bound, statuses = STALLS[name]
        assert seconds <= bound + SLACK_S, (name, seconds)
        answers = answered.split(b"HTTP/1.1 ")[1:]  # a body's JSON never holds that
        assert [answer[:3] for answer in answers] == statuses, (name, answered[:300])
        for answer in answers:
            if answer.startswith(b"408"):
                assert b"\r\nconnection: close\r\n" in answer.lower(), (name, answer)
                assert b'{"detail": "request ' in answer, (name, answer)


def test_the_server_is_unharmed_after_stalled_clients(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(3):
            response = client.post("/forecast/predict", content=BODY, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text


def test_a_slow_but_steady_request_within_the_bounds_is_served(server: Server) -> None:
    """Headers over 6 s, then the body over 6 s: each within its bound, and longer than uvicorn's 5 s keep-alive."""
    request = predict()
    split = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(address(server)) as sock:
        sock.settimeout(30)
        for part in (request[:split], request[split:]):
            pieces = [part[start : start + 8] for start in range(0, len(part), 8)]
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(6 / len(pieces))
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
