"""The entry service keeps its promises when a deployment is frozen or its clients leave."""

import socket
import threading
import time
from typing import Any

import httpx

from sheaf.streaming import SSEDecoder
from tests.conftest import Server, frozen

SLOW = {"model_type": "text_generation", "model_name": "slow-stream", "prompt": "the quick brown fox"}


def read_stream(server: Server, body: dict[str, Any], on_first_event: Any = None) -> tuple[int, list[Any], float]:
    """Status, the events and comment lines in order, and the seconds it all took."""
    started = time.monotonic()
    decoder = SSEDecoder()
    seen: list[Any] = []
    with httpx.stream("POST", f"{server.url}/textgen/stream", json=body, timeout=60) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()], time.monotonic() - started
        for chunk in response.iter_raw():
            seen.extend(line for line in chunk.decode().split("\n\n") if line.startswith(":"))
            events = decoder.feed(chunk)
            if events and on_first_event is not None and not any(isinstance(e, dict) for e in seen):
                on_first_event()
            seen.extend(events)
    return 200, seen, time.monotonic() - started


def test_a_started_stream_ends_at_its_deadline_with_heartbeats_while_the_deployment_is_frozen(
    server: Server,
) -> None:
    freezer = frozen(server, "textgen")
    body = {**SLOW, "max_new_tokens": 50, "timeout_s": 3}
    try:
        # slow-stream waits a second after its first event: the deployment is frozen by then.
        status, seen, took = read_stream(server, body, on_first_event=freezer.__enter__)
    finally:
        freezer.__exit__(None, None, None)
    assert status == 200
    events = [item for item in seen if isinstance(item, dict)]
    assert events[0]["type"] == "token"
    assert events[-1]["type"] == "error" and events[-1]["code"] == "deadline_exceeded"
    assert seen.count(": heartbeat") >= 3  # the test server beats every 0.3 s, on the entry service's clock
    assert 2.5 < took < 6


def test_a_stream_to_a_frozen_deployment_is_a_504_at_its_deadline(server: Server) -> None:
    with frozen(server, "textgen"):
        status, (body,), took = read_stream(server, {**SLOW, "max_new_tokens": 5, "timeout_s": 2})
    assert status == 504
    assert "deadline of 2 s" in body["detail"]
    assert 1.5 < took < 5


def test_health_reflects_the_deployment_process(server: Server) -> None:
    assert httpx.get(f"{server.url}/textgen/health").json() == {"status": "ok"}
    with frozen(server, "textgen"):
        started = time.monotonic()
        response = httpx.get(f"{server.url}/textgen/health", timeout=10)
        took = time.monotonic() - started
        assert httpx.get(f"{server.url}/flux/health").status_code == 200  # the others are not affected
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert took < 5
    assert httpx.get(f"{server.url}/textgen/health").status_code == 200


def test_a_predict_whose_client_left_stops_its_model_work(server: Server) -> None:
    long = {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 20000}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        started = time.monotonic()
        alone = client.post("/textgen/predict", json={**long, "max_new_tokens": 400})
        assert alone.json()["completion_tokens"] == 400
        per_token = (time.monotonic() - started) / 400
        # A client that sends the predict and hangs up half a second later.
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            payload = httpx.Request("POST", f"{server.url}/textgen/predict", json={**long, "request_id": "gone"})
            head = "POST /textgen/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}Content-Length: {len(payload.read())}\r\n\r\n".encode() + payload.read())
            time.sleep(0.5)
        started = time.monotonic()
        after = client.post("/textgen/predict", json={**long, "max_new_tokens": 4})
        waited = time.monotonic() - started
    assert after.status_code == 200
    # Run to the end, the abandoned predict would hold the deployment for 20000 tokens.
    assert waited < min(10, 20000 * per_token / 3), (waited, per_token)
    deadline = time.monotonic() + 10
    while "request_id=gone status=" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "request_id=gone status=504" in server.log_text()


def test_a_stream_waiting_for_the_adapter_lock_is_accepted_at_once(server: Server) -> None:
    hog = {"model_type": "diffusion", "prompt": "a long run", "height": 128, "width": 128, "num_inference_steps": 200}
    body = {**hog, "height": 64, "width": 64, "num_inference_steps": 2, "adapters": ["a"]}  # waits for the lock
    hog_done: list[float] = []
    with httpx.Client(base_url=server.url, timeout=120) as client:

        def hold() -> None:
            client.post("/flux/predict", json=hog)
            hog_done.append(time.monotonic())

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.3)  # the predict has the pipeline; the stream queues behind it
        with client.stream("POST", "/flux/stream", json=body) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)
            accepted_at = time.monotonic()
            rest = b"".join(chunks)
        holder.join()
    assert first.startswith(b": accepted\n\n")
    assert b'"type": "progress"' not in first  # nothing of it had run yet
    assert b'"type": "result"' in rest
    assert accepted_at < hog_done[0]  # its first bytes came while the other run still held the lock
