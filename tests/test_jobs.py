"""Jobs, served: a log that survives a cut connection, cancels that stop the model, a queue that
refuses past its size, and records that outlive a restart (SQLite and Redis)."""

import asyncio
import base64
import io
import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sheaf import AsyncSheafClient, DiffusionRequest, SheafClient, TextGenerationRequest
from sheaf.api.events import CancelledEvent, ProgressEvent, QueuedEvent, ResultEvent, TokenEvent
from sheaf.api.jobs import JobInfo
from sheaf.cli import main as cli
from sheaf.job_store import Job, RedisJobStore
from sheaf.jobs import LEASE_S, JobBoard
from sheaf.streaming import SSEDecoder
from tests.conftest import (
    Server,
    serve,
    start_server,
    stop_server,
    stream_events,
    wait_until_ready,
    worker_pids,
)
from tests.redis_server import RedisServer
from tests.round_robin import RoundRobin

FOX = {"model_type": "diffusion", "prompt": "a fox", "height": 32, "width": 32, "num_inference_steps": 40, "seed": 7}
LONG = {"model_type": "text_generation", "prompt": "Once", "max_new_tokens": 30000}
SHORT = {"model_type": "text_generation", "prompt": "Hi", "max_new_tokens": 4}


def write_configs(folder: Path, tiny_lm: Path, jobs: str) -> Path:
    (folder / "textgen.yaml").write_text(
        f'name: textgen\nmodel: {{path: "{tiny_lm}"}}\nbatching: {{max_batch_size: 4}}\n'
        "limits: {max_queued_jobs: 8, retry_after_s: 2}\nheartbeat_s: 0.3\noptions: {max_new_tokens_limit: 30000}\n"
    )
    (folder / "flux.yaml").write_text('name: flux\nmodel: {build: "tiny.models:build_tiny_flux"}\n')
    (folder / "sheaf.yaml").write_text(f"jobs: {jobs}\n")
    return folder


@pytest.fixture(scope="module")
def server(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("jobs")
    configs = write_configs(folder, tiny_lm, f"{{path: '{folder / 'jobs.sqlite3'}'}}")
    env = {"SHEAF_CACHE_DIR": str(folder / "cache")}
    yield from serve(configs, folder / "server.log", env, ready=("textgen", "flux"))


def submit(server: Server, name: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{server.url}/{name}/jobs", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/{name}/jobs/{answer.json()['job_id']}"
    job: dict[str, Any] = answer.json()
    return job


def status(server: Server, name: str, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/{name}/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def wait_for(server: Server, name: str, job_id: str, wanted: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := status(server, name, job_id))["status"] not in wanted:
        assert time.monotonic() < deadline, f"{job_id} is still {job['status']}"
        time.sleep(0.05)
    return job


def read_events(
    server: Server, name: str, job_id: str, after: int = 0, until: int | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """The job's events with their SSE ids; with `until`, the connection is closed after that many."""
    got: list[tuple[int, dict[str, Any]]] = []
    decoder = SSEDecoder()
    headers = {"last-event-id": str(after)}
    with httpx.stream("GET", f"{server.url}/{name}/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            for event_id, event in decoder.feed_with_ids(chunk):
                assert event_id is not None
                got.append((int(event_id), event))
                if event["done"] or (until is not None and len(got) >= until):
                    return got
    return got


def pixels(image_b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(image_b64))).tobytes()


def test_a_flux_job_read_again_after_a_cut_gets_every_step_once_and_the_predicts_image(server: Server) -> None:
    # Large enough that its 40 steps take seconds (2.4 s alone on one core of the tiny model), so the
    # reader comes back mid-run: it gets the log, then live events. (At 32x32 the whole job took
    # 0.2 s, and on a quiet machine it had ended before the reader came back.)
    body = {**FOX, "height": 768, "width": 768}
    job = submit(server, "flux", body)
    first = read_events(server, "flux", job["job_id"], until=8)  # then the connection is closed
    meanwhile = status(server, "flux", job["job_id"])
    rest = read_events(server, "flux", job["job_id"], after=first[-1][0])
    assert meanwhile["status"] == "running", meanwhile
    assert first[-1][0] <= meanwhile["events"] < rest[-1][0]  # the events after it were written while it read
    ids = [event_id for event_id, _ in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # no gap, nothing twice
    steps = [event["step"] for _, event in first + rest if event["type"] == "progress"]
    assert steps == list(range(1, 41))
    result = rest[-1][1]
    assert result["type"] == "result"
    predicted = httpx.post(f"{server.url}/flux/predict", json=body, timeout=120).json()
    assert pixels(result["image_b64"]) == pixels(predicted["image_b64"])
    info = status(server, "flux", job["job_id"])
    assert info["status"] == "succeeded" and info["result"]["image_b64"] == result["image_b64"]
    assert info["events"] == ids[-1]


def test_only_the_newest_preview_stays_in_a_jobs_log(server: Server) -> None:
    body = {**FOX, "num_inference_steps": 6, "preview_every": 2}
    streamed = stream_events(server, "flux", body)
    assert [event["step"] for event in streamed if event.get("preview_b64")] == [2, 4, 6]
    job = submit(server, "flux", body)
    wait_for(server, "flux", job["job_id"], {"succeeded"})  # a reader meanwhile gets each preview as it comes
    kept = [event for _, event in read_events(server, "flux", job["job_id"])]
    assert [event["step"] for event in kept if event["type"] == "progress"] == list(range(1, 7))
    assert [event["step"] for event in kept if event.get("preview_b64")] == [6]


def test_the_client_resumes_by_itself_and_the_cli_watches_a_finished_job(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    with SheafClient(server.url) as client:
        accepted = client.submit("textgen", TextGenerationRequest(prompt="Hello", max_new_tokens=12))
        events = list(client.events(accepted.job_id))
        assert isinstance(events[-1], ResultEvent)
        tokens = [event.text for event in events if isinstance(event, TokenEvent)]
        assert "".join(tokens) == events[-1].response.text
        again = list(client.events(accepted.job_id, after=2))  # the same log, from after event 2
        assert [type(event) for event in again] == [type(event) for event in events[2:]]
        assert client.job(accepted.job_id).status == "succeeded"
    assert cli(["--url", server.url, "watch", accepted.job_id, "-o", "-"]) == 0
    assert events[-1].response.text in capsys.readouterr().out
    assert cli(["--url", server.url, "submit", "textgen", "--json", '{"prompt": "Hi", "max_new_tokens": 3}']) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "queued" and printed["job_id"].startswith("textgen-")
    assert cli(["--url", server.url, "watch", printed["job_id"], "--events"]) == 0
    watched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert watched[0]["type"] == "queued" and watched[-1]["type"] == "result"
    assert cli(["--url", server.url, "watch", "not-a-job"]) == 1  # no such deployment: a 404, exit 1


def test_both_clients_resume_a_job_whose_connection_a_proxy_cuts_with_no_event_lost_or_twice(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    body = DiffusionRequest(**{**FOX, "num_inference_steps": 30})

    def steps(events: list[Any]) -> list[int]:
        assert isinstance(events[-1], ResultEvent)
        return [event.step for event in events if isinstance(event, ProgressEvent)]

    with RoundRobin([port], cut_after_bytes=1500, cuts=3).running() as cutting:
        with SheafClient(cutting.url) as client:
            job = client.submit("flux", body)
            assert steps(list(client.events(job.job_id))) == list(range(1, 31))

        async def follow() -> list[Any]:
            async with AsyncSheafClient(cutting.url) as client:
                job = await client.submit("flux", body)
                return [event async for event in client.events(job.job_id)]

        cutting.cuts_left = 3
        assert steps(asyncio.run(follow())) == list(range(1, 31))
    assert sum(cutting.connections.values()) >= 8  # each client reconnected after each of its 3 cuts


def test_cancelling_a_running_textgen_job_stops_its_model_work(server: Server) -> None:
    job = submit(server, "textgen", {**LONG, "request_id": "job-to-cancel"})
    running = wait_for(server, "textgen", job["job_id"], {"running"})
    deadline = time.monotonic() + 30
    while (running.get("progress") or {}).get("type") != "token":
        assert time.monotonic() < deadline, running
        running = status(server, "textgen", job["job_id"])
    answer = httpx.delete(f"{server.url}/textgen/jobs/{job['job_id']}", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    events = read_events(server, "textgen", job["job_id"])
    assert events[-1][1] == {"type": "cancelled", "done": True}
    deadline = time.monotonic() + 10
    while not (stopped := re.search(r"stream job-to-cancel cancelled after (\d+) tokens", server.log_text())):
        assert time.monotonic() < deadline, "the deployment never stopped the job's stream"
        time.sleep(0.1)
    assert int(stopped.group(1)) < 30000


def test_a_cancelled_queued_job_never_runs(server: Server) -> None:
    blockers = [submit(server, "textgen", {**LONG, "request_id": f"blocker-{i}"}) for i in range(4)]  # max_batch_size
    queued = submit(server, "textgen", {**SHORT, "request_id": "never-runs"})
    assert queued["position"] == 0
    assert status(server, "textgen", queued["job_id"])["status"] == "queued"
    assert httpx.delete(f"{server.url}/textgen/jobs/{queued['job_id']}", timeout=30).json()["status"] == "cancelled"
    for blocker in blockers:
        httpx.delete(f"{server.url}/textgen/jobs/{blocker['job_id']}", timeout=30)
    events = [event for _, event in read_events(server, "textgen", queued["job_id"])]
    assert [event["type"] for event in events] == ["queued", "cancelled"]
    time.sleep(1)  # had it started after all, its stream would be in the log by now
    assert "never-runs" not in server.log_text()


def test_a_burst_past_the_queue_gets_503_and_every_accepted_job_finishes_in_order(server: Server) -> None:
    # Four long jobs take every place to run (max_batch_size), so the burst waits behind them.
    blockers = [submit(server, "textgen", {**LONG, "request_id": f"burst-blocker-{i}"}) for i in range(4)]
    for blocker in blockers:
        wait_for(server, "textgen", blocker["job_id"], {"running"})
    bodies = [{**SHORT, "max_new_tokens": 24, "request_id": f"burst-{i}"} for i in range(50)]
    answers: list[httpx.Response] = [httpx.Response(0)] * len(bodies)

    def send(i: int, client: httpx.Client) -> None:
        answers[i] = client.post(f"{server.url}/textgen/jobs", json=bodies[i])

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
        threads = [threading.Thread(target=send, args=(i, client)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    refused = [answer for answer in answers if answer.status_code == 503]
    accepted = sorted((a.json() for a in answers if a.status_code == 202), key=lambda job: job["position"])
    assert len(accepted) == 8 and len(refused) == 42, [a.status_code for a in answers]  # limits.max_queued_jobs
    assert all(answer.headers["retry-after"] == "2" for answer in refused)
    assert "job queue is full" in refused[0].json()["detail"]
    assert [job["position"] for job in accepted] == list(range(8))
    for job in accepted:  # a GET of a waiting job says where it waits
        info = status(server, "textgen", job["job_id"])
        assert (info["status"], info["position"]) == ("queued", job["position"]), info

    # One place frees: the first waiting job starts and every other one moves up, which a GET shows.
    last = accepted[-1]["job_id"]
    httpx.delete(f"{server.url}/textgen/jobs/{blockers[0]['job_id']}", timeout=30).raise_for_status()
    deadline = time.monotonic() + 30
    while (moved := status(server, "textgen", last))["position"] == 7:
        assert time.monotonic() < deadline, moved
        time.sleep(0.02)
    assert moved["status"] == "queued" and moved["position"] < 7, moved  # six jobs run one at a time ahead of it
    for blocker in blockers[1:]:
        httpx.delete(f"{server.url}/textgen/jobs/{blocker['job_id']}", timeout=30).raise_for_status()

    started: list[float] = []
    for job in accepted:
        events = [event for _, event in read_events(server, "textgen", job["job_id"])]
        assert events[-1]["type"] == "result", events[-1]
        positions = [event["position"] for event in events if event["type"] == "queued"]
        assert positions[0] == job["position"], positions
        assert all(ahead < behind for behind, ahead in itertools.pairwise(positions)), positions  # only ever down
        if job["job_id"] == last:
            assert positions[:2] == [7, moved["position"]], positions  # it saw its place go down
        started.append(wait_for(server, "textgen", job["job_id"], {"succeeded"})["started_at"])
    # In their order: a job starts only once every job ahead of it has, and four places ahead
    # of it, one has finished (a place to run frees only when a job ends).
    assert all(started[i] < started[i + 4] for i in range(len(started) - 4)), started


def test_both_clients_cancel_a_queued_and_a_running_job_and_read_where_each_is(server: Server) -> None:
    def textgen(max_new_tokens: int, request_id: str) -> TextGenerationRequest:
        return TextGenerationRequest(prompt="Once", max_new_tokens=max_new_tokens, request_id=request_id)

    with SheafClient(server.url) as client:
        running = [client.submit("textgen", textgen(30000, f"client-run-{i}")) for i in range(4)]
        waiting = [client.submit("textgen", textgen(4, f"client-wait-{i}")) for i in range(2)]
        assert [job.position for job in waiting] == [0, 1]  # behind the four running ones (max_batch_size)

        async def cancel_the_first_waiting_one() -> tuple[JobInfo, JobInfo, JobInfo]:
            async with AsyncSheafClient(server.url) as aclient:
                seen = await aclient.job(waiting[0].job_id)
                cancelled = await aclient.cancel(waiting[0].job_id)
                return seen, cancelled, await aclient.job(waiting[0].job_id)

        seen, cancelled, read_back = asyncio.run(cancel_the_first_waiting_one())
        assert (seen.status, seen.position, seen.started_at) == ("queued", 0, None)
        assert (cancelled.status, cancelled.position, cancelled.started_at) == ("cancelled", None, None)
        assert cancelled.finished_at is not None and read_back == cancelled
        assert client.job(waiting[0].job_id) == cancelled
        behind = client.job(waiting[1].job_id)  # it moved up when the one ahead of it left
        assert (behind.status, behind.position) == ("queued", 0)
        cancelled = client.cancel(waiting[1].job_id)
        assert (cancelled.status, cancelled.started_at) == ("cancelled", None)
        assert [type(event) for event in client.events(waiting[1].job_id)] == [QueuedEvent, QueuedEvent, CancelledEvent]

        async def cancel_the_first_running_one() -> tuple[JobInfo, JobInfo]:
            async with AsyncSheafClient(server.url) as aclient:
                deadline = time.monotonic() + 30
                while ((now := await aclient.job(running[0].job_id)).progress or {}).get("type") != "token":
                    assert time.monotonic() < deadline, now
                    await asyncio.sleep(0.05)
                return now, await aclient.cancel(running[0].job_id)

        generating, stopped = asyncio.run(cancel_the_first_running_one())
        assert generating.status == "running" and generating.started_at is not None
        assert stopped.status == "cancelled" and stopped.started_at == generating.started_at
        assert client.job(running[0].job_id).status == "cancelled"
        assert isinstance(list(client.events(running[0].job_id))[-1], CancelledEvent)
        for job in running[1:]:
            assert client.job(job.job_id).status == "running"
            assert client.cancel(job.job_id).status == "cancelled"

    async def read_them_all() -> list[str]:
        async with AsyncSheafClient(server.url) as aclient:
            return [(await aclient.job(job.job_id)).status for job in [*running, *waiting]]

    assert asyncio.run(read_them_all()) == ["cancelled"] * 6
    deadline = time.monotonic() + 10
    while len(re.findall(r"stream client-run-\d cancelled after \d+ tokens", server.log_text())) < 4:
        assert time.monotonic() < deadline, "the deployment never stopped every cancelled job's stream"
        time.sleep(0.1)
    assert "client-wait-" not in server.log_text()  # the cancelled waiting jobs never ran


def test_an_unknown_job_is_404_and_a_bad_body_422_before_anything_queues(server: Server) -> None:
    assert httpx.get(f"{server.url}/textgen/jobs/textgen-nope", timeout=30).status_code == 404
    assert httpx.delete(f"{server.url}/textgen/jobs/textgen-nope", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/textgen/jobs/textgen-nope/events", timeout=30).status_code == 404
    job = submit(server, "flux", {**FOX, "num_inference_steps": 2})
    assert httpx.get(f"{server.url}/textgen/jobs/{job['job_id']}", timeout=30).status_code == 404  # a flux job
    bad = httpx.post(f"{server.url}/textgen/jobs", json={"model_type": "text_generation", "max_new_tokens": -1})
    assert bad.status_code == 422
    assert "max_new_tokens" in bad.text
    refused = httpx.post(f"{server.url}/textgen/jobs", json={**SHORT, "max_new_tokens": 30001}, timeout=30)
    assert refused.status_code == 422, refused.text  # the deployment's own limit, checked before it queues
    assert refused.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
    wrong_id = httpx.get(f"{server.url}/flux/jobs/{job['job_id']}/events", headers={"last-event-id": "x"}, timeout=30)
    assert wrong_id.status_code == 422 and "last-event-id" in wrong_id.text


@pytest.mark.parametrize(("store", "stop"), [("sqlite", "SIGTERM"), ("redis", "SIGKILL")])
def test_a_finished_job_outlives_a_restart_and_a_running_one_reads_failed(
    store: str, stop: str, tiny_lm: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A server stopped (its jobs end `failed` as it goes) or killed (they do once its heartbeats stop)."""
    jobs = (
        f"{{path: '{tmp_path / 'jobs.sqlite3'}'}}"
        if store == "sqlite"
        else f"{{store: redis, url: 'redis://{redis_server.address}/2'}}"
    )
    configs = write_configs(tmp_path, tiny_lm, jobs)
    env = {"SHEAF_CACHE_DIR": str(tmp_path / "cache")}
    process, first = start_server(configs, tmp_path / "first.log", env)
    try:
        wait_until_ready(process, first, ("textgen",))
        done = submit(first, "textgen", SHORT)
        finished = wait_for(first, "textgen", done["job_id"], {"succeeded"})
        cut = submit(first, "textgen", LONG)
        wait_for(first, "textgen", cut["job_id"], {"running"})
        if stop == "SIGKILL":  # the server and every worker, as when the node dies
            workers = [pid for name in ("sheaf", "textgen", "flux") for pid in worker_pids(first, name)]
            for pid in [process.pid, *workers]:
                os.kill(pid, signal.SIGKILL)
    finally:
        stop_server(process)
    process, second = start_server(configs, tmp_path / "second.log", env)
    try:
        wait_until_ready(process, second, ("textgen",))
        assert status(second, "textgen", done["job_id"])["result"] == finished["result"]
        lost = wait_for(second, "textgen", cut["job_id"], {"failed"}, timeout=LEASE_S + 5)
        assert lost["error"]["code"] == "job_lost", lost
        events = [event for _, event in read_events(second, "textgen", cut["job_id"])]
        assert events[-1]["type"] == "error" and events[-1]["code"] == "job_lost"
    finally:
        stop_server(process)


def test_two_entry_services_sharing_redis_answer_for_each_others_jobs_and_cancel_them(
    tiny_lm: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    configs = write_configs(tmp_path, tiny_lm, f"{{store: redis, url: 'redis://{redis_server.address}/4'}}")
    env = {"SHEAF_CACHE_DIR": str(tmp_path / "cache")}
    started = [start_server(configs, tmp_path / f"entry-{i}.log", env) for i in range(2)]
    try:
        for process, entry in started:
            wait_until_ready(process, entry, ("textgen",))
        one, other = (entry for _, entry in started)
        done = submit(one, "textgen", SHORT)
        events = read_events(other, "textgen", done["job_id"])  # run by one, read from the other
        assert events[-1][1]["type"] == "result"
        assert status(other, "textgen", done["job_id"])["result"]["text"] == events[-1][1]["text"]
        long = submit(one, "textgen", {**LONG, "request_id": "cancelled-elsewhere"})
        wait_for(other, "textgen", long["job_id"], {"running"})
        answer = httpx.delete(f"{other.url}/textgen/jobs/{long['job_id']}", timeout=30)
        assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
        deadline = time.monotonic() + 10
        while not re.search(r"stream cancelled-elsewhere cancelled after \d+ tokens", one.log_text()):
            assert time.monotonic() < deadline, "the replica that ran it never stopped it"
            time.sleep(0.1)
    finally:
        for process, _ in started:
            stop_server(process)


def test_a_redis_store_whose_url_names_an_unset_variable_says_so_at_first_use_not_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every pod imports the entry service's module; only the entry pod is given the jobs store's URL."""
    monkeypatch.delenv("SHEAF_JOBS_REDIS", raising=False)
    store = RedisJobStore(os.path.expandvars("${SHEAF_JOBS_REDIS}"))  # made at import: nothing checked yet
    with pytest.raises(ValueError, match=r"jobs.url '\$\{SHEAF_JOBS_REDIS\}': the environment does not set"):
        asyncio.run(store.unfinished())  # the entry service's first call, at its start
    asyncio.run(store.close())


def test_redis_may_evict_a_finished_job_but_not_a_waiting_one_and_a_lost_log_still_reads(
    redis_server: RedisServer,
) -> None:
    """Production's Redis evicts keys with a time to live (volatile-lru) before it runs out of memory."""

    async def run() -> None:
        store = RedisJobStore(f"redis://{redis_server.address}/6")
        board = JobBoard(store, ttl_s=600)
        waiting = Job(job_id="textgen-waiting", deployment="textgen", request={}, position=0, last_event=1)
        done = Job(job_id="textgen-done", deployment="textgen", request={}, last_event=1)
        for job in (waiting, done):
            job.owner, job.heartbeat_at = board.owner, time.time()
            await store.create(job, {"type": "queued", "position": 0, "done": False})
        await board._finish(done, "succeeded", {"type": "result", "done": True, "text": "hi"})
        keys = ["sheaf:job:textgen-waiting", "sheaf:job:textgen-waiting:events"]
        assert [await store._redis.ttl(key) for key in keys] == [-1, -1]  # no expiry: never evicted
        keys = ["sheaf:job:textgen-done", "sheaf:job:textgen-done:events"]
        assert all(0 < ttl <= 600 for ttl in [await store._redis.ttl(key) for key in keys])
        assert (await board.info("textgen", "textgen-done")).result == {"text": "hi"}  # type: ignore[union-attr]
        await store._redis.delete("sheaf:job:textgen-done:events")  # as Redis evicts it
        info = await board.info("textgen", "textgen-done")
        assert info is not None and (info.status, info.result) == ("succeeded", None)
        async with asyncio.timeout(5):  # the log is gone: the reading ends, not a heartbeat for ever
            assert [item async for item in board.events("textgen", "textgen-done")] == []
        await store.close()

    asyncio.run(run())


def test_queued_and_cancelled_events_parse_as_typed_events() -> None:
    from sheaf.api.events import parse_job_event
    from sheaf.api.textgen import TextGenerationResponse

    assert parse_job_event({"type": "queued", "position": 3, "done": False}, TextGenerationResponse) == QueuedEvent(
        position=3
    )
    assert isinstance(parse_job_event({"type": "cancelled", "done": True}, TextGenerationResponse), CancelledEvent)
