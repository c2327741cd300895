"""Streams that share a model call, served: flux's denoising loop, textgen's decoding batch
(which streams join while it runs) and forecast's batched call.

Each flux test first starts a long flux stream (the blocker) and waits for its first step, so
that the requests sent next queue behind it and leave together in the next batch.
"""

import asyncio
import base64
import contextlib
import io
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from sheaf.streaming import SSEDecoder
from tests.conftest import Server, speak

FOX = {"model_type": "diffusion", "prompt": "a fox", "height": 32, "width": 32, "num_inference_steps": 4}
BLOCKER = {**FOX, "num_inference_steps": 120, "request_id": "blocker"}
HISTORY = [float(i % 12) for i in range(64)]


def pixels(response: dict[str, Any]) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(response["image_b64"]))).tobytes()


async def stream(
    client: httpx.AsyncClient, name: str, body: dict[str, Any], drop_after: int = 0
) -> list[dict[str, Any]]:
    """The stream's events; with `drop_after`, the client leaves once it has that many."""
    decoder, events = SSEDecoder(), []
    async with client.stream("POST", f"/{name}/stream", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_raw():
            events += decoder.feed(chunk)
            if drop_after and len(events) >= drop_after:
                break
    return events


@asynccontextmanager
async def behind_a_blocker(
    server: Server, name: str = "flux", blocker: dict[str, Any] = BLOCKER
) -> AsyncIterator[httpx.AsyncClient]:
    """A client, while a long stream holds `name`'s model (from its first event on)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        started = asyncio.Event()

        async def block() -> None:
            decoder = SSEDecoder()
            async with client.stream("POST", f"/{name}/stream", json=blocker) as response:
                async for chunk in response.aiter_raw():
                    if decoder.feed(chunk):
                        started.set()

        blocking = asyncio.ensure_future(block())
        await asyncio.wait_for(started.wait(), 60)
        try:
            yield client
        finally:
            await blocking


def solo_predicts(server: Server, name: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = []
    for body in bodies:
        response = httpx.post(f"{server.url}/{name}/predict", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def test_concurrent_flux_streams_share_a_denoising_loop_and_each_gets_its_own_image(server: Server) -> None:
    bodies = [{**FOX, "seed": seed, "request_id": f"shared-{seed}"} for seed in range(8)]

    async def run() -> list[list[dict[str, Any]]]:
        async with behind_a_blocker(server) as client:
            return await asyncio.gather(*(stream(client, "flux", body) for body in bodies))

    streams = asyncio.run(run())
    expected = solo_predicts(server, "flux", bodies)
    for events, alone in zip(streams, expected, strict=True):
        *progress, result = events
        assert [event["step"] for event in progress] == [1, 2, 3, 4]
        assert result["type"] == "result"
        assert pixels(result) == pixels(alone)  # pixel for pixel, as alone
        assert result["metadata"]["batch_size"] == 8  # eight streams, one model call
    log = server.log_text()
    assert re.search(r"flux stream request_id=shared-0 events=5 outcome=result batch=8", log)


def test_streams_and_predicts_share_a_call_and_each_answer_equals_its_solo_run(server: Server) -> None:
    streamed = [{**FOX, "seed": seed, "request_id": f"mixed-s{seed}"} for seed in (1, 2, 3)]
    predicted = [{**FOX, "seed": seed, "request_id": f"mixed-p{seed}"} for seed in (4, 5)]

    async def run() -> tuple[list[list[dict[str, Any]]], list[httpx.Response]]:
        async with behind_a_blocker(server) as client:
            streams = asyncio.gather(*(stream(client, "flux", body) for body in streamed))
            predicts = asyncio.gather(*(client.post("/flux/predict", json=body) for body in predicted))
            return await streams, await predicts

    streams, predicts = asyncio.run(run())
    expected = solo_predicts(server, "flux", streamed + predicted)
    got = [events[-1] for events in streams] + [response.json() for response in predicts]
    assert [pixels(answer) for answer in got] == [pixels(answer) for answer in expected]
    assert {answer["metadata"]["batch_size"] for answer in got} == {5}


def test_a_client_leaving_its_batch_leaves_the_others_unharmed(server: Server) -> None:
    # Enough steps that the leaving is heard before the batch ends, however busy the machine.
    bodies = [{**FOX, "num_inference_steps": 40, "seed": seed, "request_id": f"leave-{seed}"} for seed in range(4)]

    async def run() -> list[list[dict[str, Any]]]:
        async with behind_a_blocker(server) as client:
            return await asyncio.gather(
                *(stream(client, "flux", body, drop_after=2 * (i == 0)) for i, body in enumerate(bodies))
            )

    streams = asyncio.run(run())
    assert len(streams[0]) == 2
    expected = solo_predicts(server, "flux", bodies[1:])
    assert [pixels(events[-1]) for events in streams[1:]] == [pixels(answer) for answer in expected]
    left = re.search(r"flux stream request_id=leave-0 events=(\d+) outcome=cancelled batch=4", server.log_text())
    assert left and int(left.group(1)) < 41  # it was sent no more once it had gone (the relay may be a few ahead)


def test_every_client_of_a_batch_leaving_stops_its_work(server: Server) -> None:
    bodies = [{**FOX, "num_inference_steps": 200, "seed": seed, "request_id": f"all-leave-{seed}"} for seed in range(3)]

    async def run() -> None:
        async with behind_a_blocker(server) as client:
            await asyncio.gather(*(stream(client, "flux", body, drop_after=2) for body in bodies))

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while not (stopped := re.search(r"group of 3 cancelled after (\d+) of 200 steps", server.log_text())):
        assert time.monotonic() < deadline, "the batch's loop never stopped"
        time.sleep(0.1)
    assert int(stopped.group(1)) < 200


def test_a_failing_member_of_a_batched_group_gets_an_error_event_and_the_others_their_result(server: Server) -> None:
    bodies = [{**FOX, "seed": 1, "request_id": "poison-ok-1"}, {**FOX, "seed": 2, "model_name": "fail-in-batch"}]
    bodies.append({**FOX, "seed": 3, "request_id": "poison-ok-3"})

    async def run() -> list[list[dict[str, Any]]]:
        async with behind_a_blocker(server) as client:
            return await asyncio.gather(*(stream(client, "flux", body) for body in bodies))

    first, poisoned, last = asyncio.run(run())
    assert poisoned[-1]["type"] == "error" and "injected" in poisoned[-1]["error"]
    assert [event["step"] for event in poisoned[:-1]] == [1, 2, 3, 4]
    assert first[-1]["type"] == last[-1]["type"] == "result"
    assert first[-1]["metadata"]["batch_size"] == 3


def test_concurrent_streams_with_other_adapters_never_bleed(server: Server) -> None:
    selections: list[dict[str, Any]] = [{"adapters": []}, {"adapters": ["a"]}, {"adapters": ["b"]}]
    bodies = [{**FOX, "seed": 9, **selection} for selection in selections for _ in range(2)]
    references = [
        pixels(answer) for answer in solo_predicts(server, "flux", [{**FOX, "seed": 9, **s} for s in selections])
    ]
    assert len(set(references)) == 3

    async def run() -> list[list[dict[str, Any]]]:
        async with behind_a_blocker(server) as client:
            return await asyncio.gather(*(stream(client, "flux", body) for body in bodies))

    streams = asyncio.run(run())
    for i, events in enumerate(streams):
        assert pixels(events[-1]) == references[i // 2]  # its own selection's image, no other's
        # Mixed adapter batches (the default): the three selections share one denoising loop.
        assert events[-1]["metadata"]["batch_size"] == len(bodies)


def test_forecast_streams_batch_by_default_and_answer_as_predicts_do(server: Server) -> None:
    bodies = [
        {"model_type": "time_series", "history": HISTORY, "horizon": 6 + i, "request_id": f"fc-{i}"} for i in range(6)
    ]

    async def run() -> list[list[dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream(client, "forecast", body) for body in bodies))

    streams = asyncio.run(run())
    expected = solo_predicts(server, "forecast", bodies)
    for (result,), alone in zip(streams, expected, strict=True):
        assert result["type"] == "result"
        assert result["mean"] == alone["mean"]
    assert re.search(r"forecast stream request_id=fc-0 events=1 outcome=result batch=\d+", server.log_text())


def text(events: list[dict[str, Any]]) -> str:
    *tokens, result = events
    assert result["type"] == "result", result
    assert "".join(token["text"] for token in tokens) == result["text"]
    return str(result["text"])


def test_concurrent_textgen_streams_share_a_batch_and_each_ends_at_its_own_limit(server: Server) -> None:
    bodies = [
        {"prompt": f"Story {i}:", "max_new_tokens": 6 + 6 * i, "request_id": f"tg-{i}"} for i in range(8)
    ]  # greedy: each one's text is fixed
    finished: list[str] = []

    async def run() -> list[list[dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(body: dict[str, Any]) -> list[dict[str, Any]]:
                events = await stream(client, "textgen", body)
                finished.append(body["request_id"])
                return events

            return await asyncio.gather(*(one(body) for body in bodies))

    streams = asyncio.run(run())
    alone = [asyncio.run(solo_stream(server, body)) for body in bodies]
    predicted = solo_predicts(server, "textgen", bodies)
    for events, solo, answer in zip(streams, alone, predicted, strict=True):
        assert text(events) == text(solo) == answer["text"]
    assert max(events[-1]["metadata"]["batch_size"] for events in streams) > 1  # fewer model calls than streams
    assert finished.index("tg-0") < finished.index("tg-7")  # the short one ended while the long one went on


async def solo_stream(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        return await stream(client, "textgen", body)


@asynccontextmanager
async def long_stream_running(client: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[asyncio.Future[None]]:
    """A textgen stream of `body` that has sent its first event; its client leaves on exit."""
    started = asyncio.Event()

    async def read() -> None:
        decoder = SSEDecoder()
        async with client.stream("POST", "/textgen/stream", json=body) as response:
            async for chunk in response.aiter_raw():
                if decoder.feed(chunk):
                    started.set()

    running = asyncio.ensure_future(read())
    try:
        await asyncio.wait_for(started.wait(), 60)
        yield running
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


def test_a_textgen_stream_joins_a_running_generation_and_ends_before_it(server: Server) -> None:
    long = {"prompt": "Once", "max_new_tokens": 3000, "request_id": "tg-long"}
    short = {"prompt": "Why?", "max_new_tokens": 5, "request_id": "tg-joins"}

    async def run() -> tuple[list[dict[str, Any]], bool]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
            long_stream_running(client, long) as running,
        ):
            joined = await stream(client, "textgen", short)
            return joined, not running.done()

    joined, long_still_running = asyncio.run(run())
    assert long_still_running  # the short one did not wait for the long generation to end
    assert joined[-1]["metadata"]["batch_size"] == 2  # it decoded beside the long one
    assert text(joined) == text(asyncio.run(solo_stream(server, short)))


def test_a_textgen_predict_joins_a_running_stream_and_answers_before_it_ends(server: Server) -> None:
    long = {"prompt": "Once", "max_new_tokens": 3000, "request_id": "tg-long-for-predict"}
    short = {"prompt": "Why?", "max_new_tokens": 5, "request_id": "tg-predict-joins"}

    async def run() -> tuple[httpx.Response, bool]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
            long_stream_running(client, long) as running,
        ):
            answer = await client.post("/textgen/predict", json=short)
            return answer, not running.done()

    answer, long_still_running = asyncio.run(run())
    assert answer.status_code == 200, answer.text
    assert long_still_running  # it did not wait for the long generation
    assert answer.json()["metadata"]["batch_size"] == 2
    assert answer.json()["text"] == solo_predicts(server, "textgen", [short])[0]["text"]
    assert re.search(r"textgen predict request_id=tg-predict-joins status=200 batch=2", server.log_text())


def test_a_textgen_batch_call_joins_a_running_stream_and_so_do_the_requests_after_it(server: Server) -> None:
    long = {"prompt": "Once", "max_new_tokens": 30000, "request_id": "tg-long-for-batch"}
    batch = [{"prompt": f"Batch {i}", "max_new_tokens": 5, "request_id": f"tg-batch-{i}"} for i in range(3)]
    after = {"prompt": "After", "max_new_tokens": 5, "request_id": "tg-after-batch"}

    async def run() -> tuple[httpx.Response, httpx.Response, bool]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
            long_stream_running(client, long) as running,
        ):
            answers = asyncio.ensure_future(client.post("/textgen/batch", json=batch))
            await asyncio.sleep(0.05)
            one = await client.post("/textgen/predict", json=after)
            return await answers, one, not running.done()

    answers, one, long_still_running = asyncio.run(run())
    assert long_still_running  # neither waited for the 30000 tokens
    assert answers.status_code == 200, answers.text
    assert [item["status"] for item in answers.json()] == [200] * len(batch)
    assert min(item["body"]["metadata"]["batch_size"] for item in answers.json()) > 1  # beside the long one
    expected = solo_predicts(server, "textgen", [*batch, after])
    assert [item["body"]["text"] for item in answers.json()] == [answer["text"] for answer in expected[:3]]
    assert one.status_code == 200, one.text
    assert one.json()["text"] == expected[3]["text"]


def test_more_predicts_than_a_running_call_has_room_for_join_as_rows_end_not_after_it(server: Server) -> None:
    # textgen's test config: max_batch_size 16, so 19 predicts beside the long stream do not all fit at once.
    long = {"prompt": "Once", "max_new_tokens": 30000, "request_id": "tg-long-for-many"}
    many = [{"prompt": f"Many {i}", "max_new_tokens": 6, "request_id": f"tg-many-{i}"} for i in range(19)]

    async def run() -> tuple[list[httpx.Response], bool]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
            long_stream_running(client, long) as running,
        ):
            answers = await asyncio.gather(*(client.post("/textgen/predict", json=body) for body in many))
            return list(answers), not running.done()

    answers, long_still_running = asyncio.run(run())
    assert [answer.status_code for answer in answers] == [200] * len(many), [a.text for a in answers]
    assert long_still_running  # none waited for the long generation to end
    assert max(answer.json()["metadata"]["batch_size"] for answer in answers) <= 16
    expected = solo_predicts(server, "textgen", many[:2])
    assert [answer.json()["text"] for answer in answers[:2]] == [answer["text"] for answer in expected]


def test_textgen_streams_and_predicts_share_a_batch_and_answer_as_alone(server: Server) -> None:
    streamed = [{"prompt": f"Mixed {i}", "max_new_tokens": 10 + i, "request_id": f"tgm-s{i}"} for i in range(3)]
    predicted = [{"prompt": f"Mixed {i}", "max_new_tokens": 10 + i, "request_id": f"tgm-p{i}"} for i in range(3, 5)]

    async def run() -> tuple[list[list[dict[str, Any]]], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            streams = asyncio.gather(*(stream(client, "textgen", body) for body in streamed))
            predicts = asyncio.gather(*(client.post("/textgen/predict", json=body) for body in predicted))
            return await streams, await predicts

    streams, predicts = asyncio.run(run())
    expected = solo_predicts(server, "textgen", streamed + predicted)
    got = [text(events) for events in streams] + [response.json()["text"] for response in predicts]
    assert got == [answer["text"] for answer in expected]


def test_concurrent_whisper_streams_share_a_batch_and_each_gets_its_own_segments(
    server: Server, tmp_path: Path
) -> None:
    texts = [
        "Please send the report to my office before noon on Friday.",
        "My brother bought a new car last week and drove it to the city.",
        "Thank you very much for your help with the project.",
        "It is important to drink water and sleep well every night.",
    ]
    clips = [base64.b64encode(speak(text, tmp_path / f"clip-{i}.wav")).decode() for i, text in enumerate(texts)]
    bodies = [{"audio_b64": clip, "request_id": f"wh-{i}"} for i, clip in enumerate(clips)]

    async def run() -> list[list[dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream(client, "whisper", body) for body in bodies))

    streams = asyncio.run(run())
    for events, spoken in zip(streams, texts, strict=True):
        *segments, result = events
        assert result["type"] == "result" and [event["type"] for event in segments] == ["segment"] * len(segments)
        assert [event["segment"] for event in segments] == result["segments"]  # sent as they decoded
        said, heard = (set(re.findall(r"[a-z]+", text.lower())) for text in (spoken, result["text"]))
        assert len(said & heard) >= 0.7 * len(said), (spoken, result["text"])  # its own clip's words
        assert result["metadata"]["batched"] is True
    # The first one runs alone while the rest queue behind it; those leave in one call.
    assert max(events[-1]["metadata"]["batch_size"] for events in streams) > 1
