"""SSE framing and decoding, and the thread-to-event-loop bridge."""

import asyncio
import json
import threading
import time
from collections.abc import Generator
from contextlib import aclosing

import pytest

from sheaf.api import ErrorEvent, ResultEvent, TextGenerationResponse, TokenEvent
from sheaf.streaming import (
    ACCEPTED,
    HEARTBEAT,
    IDLE,
    FrameRelay,
    Handover,
    Idle,
    SSEDecoder,
    encode_event,
    error_event,
    iterate_in_thread,
    parse_frame,
)

RESULT: ResultEvent[TextGenerationResponse] = ResultEvent(
    response=TextGenerationResponse(
        request_id="r", model_name="m", text="héllo ✓", finish_reason="stop", prompt_tokens=1, completion_tokens=2
    )
)


def test_events_are_framed_as_one_ascii_data_line() -> None:
    frame = encode_event(TokenEvent(text="né\n", index=3))
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert frame.isascii()
    assert frame.count("\n") == 2
    assert json.loads(frame[6:]) == {"type": "token", "text": "né\n", "index": 3, "done": False}


def test_result_events_are_flat_on_the_wire() -> None:
    payload = json.loads(encode_event(RESULT)[6:])
    assert payload["type"] == "result" and payload["done"] is True
    assert payload["text"] == "héllo ✓"
    assert "response" not in payload


def test_error_event_names_the_exception() -> None:
    event = error_event(ValueError("bad thing"))
    assert event == ErrorEvent(error="ValueError: bad thing", code="backend_error")


def test_decoder_reassembles_events_split_at_every_byte() -> None:
    events = [TokenEvent(text="a", index=0), TokenEvent(text="✓", index=1), RESULT]
    wire = "".join(encode_event(event) for event in events).encode()
    for size in (1, 2, 3, 7, 64, len(wire)):
        decoder = SSEDecoder()
        decoded = [payload for i in range(0, len(wire), size) for payload in decoder.feed(wire[i : i + size])]
        assert [payload["type"] for payload in decoded] == ["token", "token", "result"]
        assert decoded[1]["text"] == "✓"
        assert not decoder.pending


def test_an_events_id_goes_before_its_data_and_comes_back_with_it() -> None:
    wire = encode_event({"type": "progress", "step": 1}, event_id=7) + encode_event({"type": "result", "done": True})
    assert wire.startswith('id: 7\ndata: {"type": "progress"')
    assert SSEDecoder().feed_with_ids(wire) == [
        ("7", {"type": "progress", "step": 1}),
        (None, {"type": "result", "done": True}),
    ]


def test_decoder_accepts_crlf_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    wire = b': heartbeat\r\n\r\ndata: {"type": "token",\r\ndata: "text": "x", "index": 0}\r\n\r\n'
    assert decoder.feed(wire) == [{"type": "token", "text": "x", "index": 0}]


def test_handover_batches_give_what_waits_at_once_and_the_failure_after_it() -> None:
    def put_then_fail(handover: Handover[int]) -> None:
        handover.put(3)
        handover.fail(ValueError("late"))

    async def main() -> list[object]:
        handover: Handover[int] = Handover()
        seen: list[object] = []
        handover.put(1)
        handover.put(2)  # both handed over before the reader looks: one batch
        try:
            async for batch in handover.batches():
                seen.append(batch)
                if batch == [1, 2]:
                    threading.Thread(target=put_then_fail, args=(handover,)).start()
        except ValueError as exc:
            seen.append(str(exc))
        return seen

    assert asyncio.run(main()) == [[1, 2], [3], "late"]  # the items before the failure, never lost with it


def test_a_frame_that_is_not_an_event_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_frame("data: [1, 2]")
    assert parse_frame(": only a comment") is None


def test_iterate_in_thread_hands_over_items_as_they_come() -> None:
    def produce(cancel: threading.Event) -> Generator[float, None, None]:
        for _ in range(3):
            yield time.monotonic()
            time.sleep(0.2)

    async def consume() -> list[float]:
        items = iterate_in_thread(produce)
        return [time.monotonic() - produced async for produced in items if isinstance(produced, float)]

    delays = asyncio.run(consume())
    assert len(delays) == 3
    assert max(delays) < 0.15  # each item arrives long before the producer's next one


def test_iterate_in_thread_raises_the_producers_error_after_its_items() -> None:
    def produce(cancel: threading.Event) -> Generator[int, None, None]:
        yield 1
        raise KeyError("gone")

    async def consume() -> list[int | Idle]:
        got = []
        with pytest.raises(KeyError):
            async for item in iterate_in_thread(produce):
                got.append(item)
        return got

    assert asyncio.run(consume()) == [1]


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    closed = threading.Event()
    produced = []

    def produce(cancel: threading.Event) -> Generator[int, None, None]:
        try:
            for i in range(1000):
                if cancel.is_set():
                    return
                produced.append(i)
                yield i
                time.sleep(0.01)
        finally:
            closed.set()

    async def consume() -> None:
        async with aclosing(iterate_in_thread(produce)) as items:
            async for item in items:
                if item == 2:
                    break

    asyncio.run(consume())
    assert closed.wait(2)
    assert len(produced) < 10


def test_a_cancelled_consumer_stops_the_producer() -> None:
    stopped = threading.Event()

    def produce(cancel: threading.Event) -> Generator[int, None, None]:
        for i in range(1000):
            if cancel.wait(0.01):
                stopped.set()
                return
            yield i

    async def consume() -> None:
        async for _ in iterate_in_thread(produce):
            pass

    async def cancel_soon() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert stopped.wait(2)


def test_a_quiet_producer_gives_idle_beats_and_a_deadline_stops_it() -> None:
    stopped = threading.Event()

    def produce(cancel: threading.Event) -> Generator[int, None, None]:
        yield 1
        cancel.wait(10)  # a model step that notices cancel
        stopped.set()
        yield 2

    async def consume() -> list[int | Idle]:
        got: list[int | Idle] = []
        with pytest.raises(TimeoutError):
            async for item in iterate_in_thread(produce, idle_s=0.1, timeout_s=0.55):
                got.append(item)
        return got

    got = asyncio.run(consume())
    assert got[0] == 1 and set(got[1:]) == {IDLE} and 3 <= len(got[1:]) <= 5
    assert stopped.wait(2)  # the producer was told to stop at the deadline


def test_frame_relay_passes_whole_frames_on_and_reads_only_the_last() -> None:
    relay = FrameRelay()
    wire = encode_event({"type": "token", "text": "a", "done": False}) + HEARTBEAT
    wire += encode_event({"type": "result", "done": True, "text": "ab"})
    out = [relay.feed(wire[i : i + 7]) for i in range(0, len(wire), 7)]
    assert "".join(out) == wire  # every byte, in order, and only whole frames at a time
    assert all(piece == "" or piece.endswith("\n\n") for piece in out)
    assert FrameRelay.last_event(wire) == {"type": "result", "done": True, "text": "ab"}
    assert FrameRelay.last_event(HEARTBEAT + ACCEPTED) is None
