"""What every deployment does around its backend, whatever serves it.

`Deployment` loads the backend off the start-up path and answers three calls:

- `predict(requests)`: a batch, one outcome per request, `{"status": int, "body": dict}`, so
  one request's error never fails its batch-mates. Feast lookups of `feature_ref` for the
  whole batch go to the store in one call, then the predict cache answers what it can
  (both `sheaf.lookups`), then the backend answers the rest in one model call.
- `stream(request)`: SSE frames as the backend makes events. Feast runs first here too. The
  stream then takes a seat (`sheaf.seats.StreamSeat`) in the same batcher as the predicts, and its batch
  runs the backend's `stream_batch`, which hands each event to its seat as it is made (a
  backend with `streams_alone` streams it on a thread of its own instead). A backend that
  `joins_running` runs every batch that way, and a stream or predict (each item of a `/batch`
  call too) that arrives while one runs joins it (`RunningCall`, from the moment its batch
  leaves the queue) unless something waits in the queue (for the next call, as the running
  one ended); it waits there for room, first come first served, rather than for the call to
  end. A failure before
  the first event is sent as an error event that also carries `status` and `body`, which
  the gateway turns into a plain HTTP error; a failure after it ends the stream with an
  `error` event. Streams never use the cache.
- `ready()`: whether the model has loaded.

`batcher` forms the batches (`sheaf.batching`), one in the model at a time. Nothing here
knows BentoML; `sheaf.service` serves it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from typing import Any

from sheaf import metrics
from sheaf.api.base import BaseRequest
from sheaf.api.events import ResultEvent, StreamEvent
from sheaf.backends.base import (
    ADMITTED,
    Admitted,
    AnyEvent,
    Backend,
    Cancelled,
    limit_torch_threads,
)
from sheaf.batching import Batcher, QueueFull
from sheaf.config import DeploymentConfig
from sheaf.lookups import Lookups, with_metadata
from sheaf.outcomes import Outcome, error_outcome, failure, success
from sheaf.seats import EventBatch, RunningCall, StreamSeat
from sheaf.streaming import ACCEPTED, HEARTBEAT, Idle, encode_event, error_event, iterate_in_thread

logger = logging.getLogger("sheaf.deployment")


def import_string(path: str) -> Any:
    """The object `module:name` names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Deployment:
    def __init__(self, config: DeploymentConfig, backend: str) -> None:
        self.config = config
        self.backend: Backend[Any, Any] = import_string(config.backend or backend)(config)
        self.lookups = Lookups(config)
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.running: RunningCall | None = None  # a joinable call in the model, while one runs
        # One batch in the model at a time; predicts and streams share it.
        self.batcher: Batcher[BaseRequest[Any] | StreamSeat, Outcome] = Batcher(
            self._run_batch,
            max_batch_size=config.batching.max_batch_size,
            max_queue_s=config.batching.max_queue_ms / 1000,
        )

    def _run_batch(self, items: list[BaseRequest[Any] | StreamSeat]) -> Awaitable[list[Outcome]]:
        """The batch's outcomes; from the moment it leaves the queue, requests that arrive may join
        its call (a backend that `joins_running`)."""
        return self._answer_batch(items, self._joinable(len(items)) if self.backend.joins_running else None)

    async def _answer_batch(
        self, items: list[BaseRequest[Any] | StreamSeat], running: RunningCall | None
    ) -> list[Outcome]:
        try:
            return await self._cancellable_run(items, running)
        finally:
            self._close(running)  # it may have ended before the model ran (cache hits, model not loaded)

    async def _cancellable_run(
        self, items: list[BaseRequest[Any] | StreamSeat], running: RunningCall | None
    ) -> list[Outcome]:
        cancel = threading.Event()
        work = asyncio.ensure_future(self.run(items, cancel, running))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # Every caller has gone: the model stops, and the next batch starts only once it has.
            cancel.set()
            await work
            raise

    def start(self) -> None:
        """Load in the background: health answers at once and `ready` says when the model is in."""
        threading.Thread(target=self._load, name=f"load-{self.config.name}", daemon=True).start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.lookups.load()
            limit_torch_threads(self.config.model_threads())
            self.backend.load()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("deployment %s failed to load", self.config.name)
        else:
            self.loaded.set()
            logger.info("deployment %s loaded in %.1f s", self.config.name, time.perf_counter() - started)

    async def check(self, request: BaseRequest[Any]) -> Outcome:
        """What the request alone would be refused for before the model runs (200: nothing), as a
        job is checked before it queues."""
        if unavailable := self._unavailable():
            return unavailable
        try:
            if self.backend.quick_check(request):
                self.backend.check(request)
            else:
                await asyncio.to_thread(self.backend.check, request)
        except Exception as exc:
            return failure(exc)
        return success({"status": "ok"})

    def ready(self) -> Outcome:
        return self._unavailable() or success({"status": "ready", "model": self.config.name})

    def _unavailable(self) -> Outcome | None:
        if self.loaded.is_set():
            return None
        detail = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
        return error_outcome(503, detail)

    async def submit(self, requests: Sequence[BaseRequest[Any]]) -> list[Outcome]:
        """One outcome per request, in order, from a model call shared with other callers' requests
        (`QueueFull` when none took them in time). When the backend `joins_running`, they join the
        call running now, each as it has room (a `/batch` call too: queued, it would wait for the
        longest stream of that call to end, and every later request behind it); the rest queue for
        the next batch."""
        if not self._can_join():
            return await self.batcher.submit(list(requests))
        joined = await asyncio.gather(*(self._predict_in_running_call(request) for request in requests))
        left: list[BaseRequest[Any] | StreamSeat] = [
            request for request, outcome in zip(requests, joined, strict=True) if outcome is None
        ]
        queued = iter(await self.batcher.submit(left) if left else [])
        return [next(queued) if outcome is None else outcome for outcome in joined]

    def _can_join(self) -> bool:
        return self.running is not None and not self.batcher.waiting

    async def _predict_in_running_call(self, request: BaseRequest[Any]) -> Outcome | None:
        """The predict's outcome from the call running now, or None when it could not join it."""
        batch: list[BaseRequest[Any]] = [request]
        outcomes, metadata, keys = await self.lookups.before_model(batch)
        if outcomes[0] is not None:
            return with_metadata(outcomes[0], metadata[0])
        seat = StreamSeat(batch[0], streaming=False)
        if self.running is None or not self.running.join(seat):
            return None
        budget = self.config.timeout_for(request.timeout_s)
        outcome: Outcome = failure(RuntimeError("the backend gave no result"))
        try:
            async with aclosing(seat.events.items(timeout_s=budget)) as events:
                async for event in events:
                    if isinstance(event, ResultEvent):
                        outcome = success(event.response.model_dump(mode="json"))
                        break
        except TimeoutError:
            outcome = failure(Cancelled(f"no result within the deadline of {budget:g} s"))
        except QueueFull:
            raise
        except Exception as exc:  # its own failure
            outcome = failure(exc)
        finally:
            seat.cancel.set()
            if seat.queued is not None:
                seat.queued.cancel()
        await self.lookups.remember(keys.get(0), outcome)
        self._log_predict(request, outcome, seat.batch_size)
        return with_metadata(outcome, metadata[0])

    async def predict(
        self, requests: Sequence[BaseRequest[Any]], cancel: threading.Event | None = None
    ) -> list[Outcome]:
        """One outcome per request; the model work stops once `cancel` is set (its caller has gone)
        or the batch's deadline has passed."""
        return await self.run(requests, cancel)

    async def run(
        self,
        items: Sequence[BaseRequest[Any] | StreamSeat],
        cancel: threading.Event | None = None,
        running: RunningCall | None = None,
    ) -> list[Outcome]:
        """One model call for a batch of predicts and streams: an outcome per predict, in order
        (a stream's outcome is its events, handed to its seat; its place in the list says nothing)."""
        cancel = cancel or threading.Event()  # none given: never set
        if unavailable := self._unavailable():
            return [unavailable] * len(items)
        seats = [item if isinstance(item, StreamSeat) else None for item in items]
        streams = [seat for seat in seats if seat is not None]
        if running is None:  # else counted once the call has ended, with the requests that joined it
            metrics.BATCH_SIZE.labels(self.config.name, "stream" if streams else "predict").observe(len(items))
        for seat in streams:
            seat.batch_size = len(items)
        batch = [item for item in items if not isinstance(item, StreamSeat)]
        outcomes, metadata, keys = await self.lookups.before_model(batch)
        pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if pending or streams:
            model_requests = [batch[i] for i in pending] + [seat.request for seat in streams]
            if streams or self.backend.joins_running:  # a joinable call takes streams while it runs
                seats = [None] * len(pending) + streams
                answers = await self._stream_backend(model_requests, seats, cancel, running)
            else:
                answers = await self._run_backend(model_requests, cancel)
            for i, outcome in zip(pending, answers, strict=False):  # the streams' answers went to their seats
                outcomes[i] = outcome
                await self.lookups.remember(keys.get(i), outcome)
        if running is not None:
            joined = list(running.arrivals.taken.values())
            route = "stream" if streams or any(arrival.streaming for arrival in joined) else "predict"
            metrics.BATCH_SIZE.labels(self.config.name, route).observe(len(items) + len(joined))
        answered = iter([with_metadata(o, extra) for o, extra in zip(outcomes, metadata, strict=True) if o])
        results: list[Outcome] = []
        for item in items:
            if isinstance(item, StreamSeat):
                results.append(success({}))  # the stream's answer went to its seat
                continue
            outcome = next(answered)
            results.append(outcome)
            self._log_predict(item, outcome, len(items))
        return results

    def _log_predict(self, request: BaseRequest[Any], outcome: Outcome, batch_size: int) -> None:
        logger.info(
            "%s predict request_id=%s status=%d batch=%d worker=%d",
            self.config.name,
            request.request_id,
            outcome["status"],
            batch_size,
            os.getpid(),  # which replica: each batches what it receives
        )

    async def _stream_backend(
        self,
        requests: list[BaseRequest[Any]],
        seats: list[StreamSeat | None],
        cancel: threading.Event,
        running: RunningCall | None = None,
    ) -> list[Outcome]:
        """`stream_batch` over `requests`: each seat's events go to it as they are made; the predicts
        (no seat) get their outcomes, in order, from their results."""
        budget = self.config.timeout_for(*(r.timeout_s for r in requests))
        timer = asyncio.get_running_loop().call_later(budget, cancel.set)
        cancels = [AnyEvent(cancel) if seat is None else AnyEvent(seat.cancel, cancel) for seat in seats]
        outcomes: list[Outcome | None] = [None if seat is None else success({}) for seat in seats]
        if running is None and self.backend.joins_running:  # called directly, not by the batcher
            running = self._joinable(len(requests))

        def emit(index: int, event: StreamEvent | Admitted | Exception) -> None:
            seat = seats[index] if index < len(seats) else running.joined[index] if running else None
            if seat is not None:
                if isinstance(event, Exception):
                    seat.events.fail(event)
                elif not seat.cancel.is_set():  # else nobody reads it
                    if isinstance(event, ResultEvent):
                        seat.batch_size = event.response.metadata.get("batch_size", seat.batch_size)
                    seat.events.put(event)
            elif isinstance(event, Exception):
                outcomes[index] = failure(event)
            elif isinstance(event, ResultEvent):
                outcomes[index] = success(event.response.model_dump(mode="json"))

        failed: Exception | None = None
        try:
            arrivals = running.arrivals if running else None
            streaming = [seat is not None and seat.streaming for seat in seats]
            await asyncio.to_thread(self.backend.stream_batch, requests, cancels, emit, arrivals, streaming)
        except Exception as exc:  # the model call itself failed: every request of it still open gets the error
            if not isinstance(exc, Cancelled):
                logger.exception("batch of %d failed on %s", len(requests), self.config.name)
            failed = exc
            outcomes = [failure(exc) if outcome is None else outcome for outcome in outcomes]
        finally:
            timer.cancel()
            for seat in [*seats, *self._close(running)]:
                if seat is not None:
                    if failed is not None:
                        seat.events.fail(failed)
                    seat.events.end()  # one that got no result hears that the call ended
        # A predict with no result: stopped with its batch (its callers gone, or its deadline past), or a backend's bug.
        unanswered = Cancelled("the batch stopped") if cancel.is_set() else RuntimeError("the backend gave no result")
        return [failure(unanswered) if outcome is None else outcome for outcome in outcomes]

    def _joinable(self, count: int) -> RunningCall:
        """The call about to run `count` requests, which others may join (up to `max_batch_size` rows
        at a time: the backend takes them as it has room)."""
        self.running = RunningCall(count)
        return self.running

    def _close(self, running: RunningCall | None) -> list[StreamSeat]:
        """The streams that joined `running`, now ended; those offered to it too late queue for the next call."""
        if running is None:
            return []
        if self.running is running:
            self.running = None
        for index in running.arrivals.close():
            self._queue(running.joined.pop(index))
        return [running.joined[index] for index in running.arrivals.taken]

    async def _run_backend(self, requests: list[BaseRequest[Any]], cancel: threading.Event) -> list[Outcome]:
        # The model work stops once the last deadline of the batch has passed: nobody waits for it then.
        budget = self.config.timeout_for(*(r.timeout_s for r in requests))
        timer = asyncio.get_running_loop().call_later(budget, cancel.set)
        try:
            results = await asyncio.to_thread(self.backend.predict_batch, requests, cancel)
        except Exception as exc:  # the model call itself failed: every request of it gets the error
            if not isinstance(exc, Cancelled):
                logger.exception("batch of %d failed on %s", len(requests), self.config.name)
            return [failure(exc)] * len(requests)
        finally:
            timer.cancel()
        if len(results) != len(requests):
            mismatch = RuntimeError(f"backend answered {len(results)} outcomes for {len(requests)} requests")
            return [failure(mismatch)] * len(requests)
        return [failure(r) if isinstance(r, BaseException) else success(r.model_dump(mode="json")) for r in results]

    async def stream(self, request: BaseRequest[Any]) -> AsyncGenerator[str, None]:
        if unavailable := self._unavailable():
            yield encode_event({"type": "error", "done": True, "error": "unavailable", **unavailable})
            return
        batch: list[BaseRequest[Any]] = [request]
        refused: list[Outcome | None] = [None]
        metadata: list[dict[str, Any]] = [{}]
        await self.lookups.resolve_features(batch, refused, metadata)  # streams never use the cache
        if refused[0] is not None:
            yield encode_event({"type": "error", "done": True, "error": "refused", **refused[0]})
            return
        request = batch[0]
        name, sent, outcome = self.config.name, 0, "cancelled"  # until the stream says otherwise
        accepted = False  # once true, the client has a 200 and a failure is an error event
        budget = self.config.timeout_for(request.timeout_s)
        seat = StreamSeat(request)
        try:
            events = self._alone(request, budget) if self.backend.streams_alone else self._seated(seat, budget)
            async with aclosing(events):
                async for handed in events:
                    if isinstance(handed, Idle):
                        if accepted:  # before, the answer may still become a plain HTTP error
                            yield HEARTBEAT
                        continue
                    frames = []  # sent as one write: under load, events wait for the loop together
                    for event in handed:
                        if isinstance(event, Admitted):
                            if not accepted:
                                accepted = True
                                frames.append(ACCEPTED)
                            continue
                        if isinstance(event, ResultEvent):
                            event.response.metadata.update(metadata[0])
                            outcome = "result"
                        sent += 1
                        accepted = True
                        metrics.STREAM_EVENTS.labels(name, event.type).inc()
                        frames.append(encode_event(event))
                        if outcome == "result":
                            break
                    if frames:
                        yield "".join(frames)
                    if outcome == "result":
                        return
            raise RuntimeError("the backend ended the stream without a result")
        except QueueFull as exc:
            outcome = "refused"
            retry = self.config.limits.retry_after_s
            busy = error_outcome(503, f"deployment {name} is busy: {exc}; retry after {retry} s")
            yield encode_event({"type": "error", "done": True, "error": "busy", **busy})
        except TimeoutError:  # the backend's thread was told to stop when `events` closed
            outcome = "deadline"
            detail = f"no result within the deadline of {budget:g} s"
            if accepted:
                metrics.STREAM_EVENTS.labels(name, "error").inc()
                yield encode_event({"type": "error", "done": True, "error": detail, "code": "deadline_exceeded"})
            else:
                yield encode_event({"type": "error", "done": True, "error": detail, **error_outcome(504, detail)})
        except Exception as exc:
            if accepted:
                outcome = "error"
                logger.exception("%s stream request_id=%s failed after it began", name, request.request_id)
                metrics.STREAM_ERRORS.labels(name).inc()
                metrics.STREAM_EVENTS.labels(name, "error").inc()
                yield encode_event(error_event(exc))
            else:
                outcome = "refused"
                yield encode_event({**error_event(exc).model_dump(), **failure(exc)})
        finally:
            if outcome == "cancelled":
                metrics.STREAMS_CANCELLED.labels(name).inc()
            logger.info(
                "%s stream request_id=%s events=%d outcome=%s batch=%d",
                name,
                request.request_id,
                sent,
                outcome,
                seat.batch_size,
            )

    async def _alone(self, request: BaseRequest[Any], budget: float) -> AsyncGenerator[EventBatch | Idle]:
        """The stream's events from the backend's `stream`, on a thread of its own."""
        events = iterate_in_thread(
            lambda cancel: self.backend.stream(request, cancel), idle_s=self.config.heartbeat_s, timeout_s=budget
        )
        async with aclosing(events):
            async for event in events:
                yield event if isinstance(event, Idle) else [event]

    async def _seated(self, seat: StreamSeat, budget: float) -> AsyncGenerator[EventBatch | Idle]:
        """The seat's events, as they come, from the batch it joins in the queue once its request
        passed the backend's checks; leaving gives up its place (and the batch's model work, when it
        was the last one waiting on it)."""
        if self.backend.quick_check(seat.request):  # a refusal is still a plain HTTP error
            self.backend.check(seat.request)
        else:
            await asyncio.to_thread(self.backend.check, seat.request)
        yield [ADMITTED]  # while it queues behind the batch in the model
        if not self._join_running(seat):
            self._queue(seat)
        try:
            async with aclosing(seat.events.batches(idle_s=self.config.heartbeat_s, timeout_s=budget)) as events:
                async for batch in events:
                    yield batch
        finally:
            seat.cancel.set()
            if seat.queued is not None:
                seat.queued.cancel()

    def _join_running(self, seat: StreamSeat) -> bool:
        """Seat the stream in the call running now, if it joins running calls and no one waits in the
        queue (who would otherwise wait for as long as others keep joining)."""
        return self._can_join() and self.running is not None and self.running.join(seat)

    def _queue(self, seat: StreamSeat) -> None:
        if seat.cancel.is_set():  # its reader has gone
            return
        seat.queued = queued = asyncio.ensure_future(self.batcher.submit([seat]))

        def refused(task: asyncio.Future[list[Outcome]]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None:
                seat.events.fail(exc)  # QueueFull: no batch took it in time

        queued.add_done_callback(refused)
