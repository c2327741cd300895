"""`SheafClient` and `AsyncSheafClient` against a real server, and BentoML's generated clients."""

import asyncio
import http.server
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import bentoml
import pytest

from sheaf import (
    AsyncSheafClient,
    ClientError,
    FeatureEntityNotFound,
    FeatureLookupError,
    FeatureRef,
    FeatureRefInvalid,
    ForecastRequest,
    InvalidRequest,
    ResultEvent,
    ServerError,
    SheafClient,
    StreamError,
    TextGenerationRequest,
    TextGenerationResponse,
    TokenEvent,
    TransportError,
)
from sheaf.streaming import SSEDecoder
from tests.conftest import ROOT, Server, free_port


def request(**fields: Any) -> TextGenerationRequest:
    return TextGenerationRequest(**{"prompt": "once upon a time", "max_new_tokens": 10, **fields})


def test_sync_predict_and_stream(server: Server) -> None:
    with SheafClient(server.url) as client:
        response = client.predict("textgen", request(request_id="c-1"))
        assert isinstance(response, TextGenerationResponse)
        assert response.request_id == "c-1"
        events = list(client.stream("textgen", request()))
    *tokens, result = events
    assert all(isinstance(event, TokenEvent) for event in tokens)
    assert isinstance(result, ResultEvent)
    assert isinstance(result.response, TextGenerationResponse)
    assert result.response.text == "".join(event.text for event in tokens if isinstance(event, TokenEvent))
    assert result.response.text == response.text
    with SheafClient(server.url) as client:
        assert client.health("textgen") == {"status": "ok"}
        assert client.ready("textgen") == {"status": "ready", "model": "textgen"}


def comparable(event: Any) -> Any:
    """An event or response without its metadata, which holds timings."""
    if isinstance(event, ResultEvent):
        return comparable(event.response)
    return event.model_dump(exclude={"metadata"})


def test_async_twin_gives_the_same_answers(server: Server) -> None:
    same = request(request_id="twin")

    async def run() -> tuple[TextGenerationResponse, list[Any], dict[str, Any]]:
        async with AsyncSheafClient(server.url) as client:
            response = await client.predict("textgen", same)
            events = [event async for event in client.stream("textgen", same)]
            return response, events, await client.ready("textgen")

    response, events, ready = asyncio.run(run())
    assert ready == {"status": "ready", "model": "textgen"}
    with SheafClient(server.url) as client:
        assert comparable(response) == comparable(client.predict("textgen", same))
        assert [comparable(e) for e in events] == [comparable(e) for e in client.stream("textgen", same)]


def test_errors_are_typed(server: Server) -> None:
    with SheafClient(server.url) as client:
        with pytest.raises(ClientError) as invalid:
            client.predict("textgen", request(max_new_tokens=31000))
        assert invalid.value.status_code == 422
        assert "max_new_tokens" in str(invalid.value.detail)
        with pytest.raises(ClientError) as invalid_stream:
            list(client.stream("textgen", request(max_new_tokens=31000)))
        assert invalid_stream.value.status_code == 422
        with pytest.raises(ServerError) as failed:
            client.predict("textgen", request(model_name="fail-in-batch"))
        assert failed.value.status_code == 500
        assert failed.value.detail == "InjectedFault: injected for this request"
        received = []
        with pytest.raises(StreamError, match="InjectedFault"):
            for event in client.stream("textgen", request(model_name="fail-mid-stream")):
                received.append(event)
        assert len(received) == 2
        with pytest.raises(ClientError) as unknown:
            client.predict("nosuch", request())
        assert unknown.value.status_code == 404
    with SheafClient(f"http://127.0.0.1:{free_port()}") as nobody, pytest.raises(TransportError):
        nobody.predict("textgen", request())


def test_bentoml_generated_clients_call_predict_and_stream(server: Server) -> None:
    body = request(request_id="gen-1").model_dump()
    with bentoml.SyncHTTPClient(server.url) as client:
        answer = client.textgen_predict(body)
        decoder = SSEDecoder()
        events = [event for chunk in client.textgen_stream(body) for event in decoder.feed(chunk)]
    assert answer["request_id"] == "gen-1"
    assert events[-1]["type"] == "result"
    assert events[-1]["text"] == answer["text"]

    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with bentoml.AsyncHTTPClient(server.url) as client:
            answer = await client.textgen_predict(body)
            decoder = SSEDecoder()
            events = [event async for chunk in client.textgen_stream(body) for event in decoder.feed(chunk)]
            return answer, events

    async_answer, async_events = asyncio.run(run())
    assert async_answer["text"] == answer["text"]
    assert [{**e, "metadata": None} for e in async_events] == [{**e, "metadata": None} for e in events]


def test_batch_gives_each_request_its_response_or_its_own_error(server: Server) -> None:
    requests = [request(request_id="b-0"), request(request_id="b-1", max_new_tokens=31000), request(request_id="b-2")]
    with SheafClient(server.url) as client:
        first, refused, last = client.batch("textgen", requests)
        alone = client.predict("textgen", requests[0])
    assert isinstance(first, TextGenerationResponse) and first.text == alone.text
    assert isinstance(refused, ClientError) and refused.status_code == 422
    assert isinstance(last, TextGenerationResponse) and last.request_id == "b-2"

    async def run() -> list[Any]:
        async with AsyncSheafClient(server.url) as client:
            return await client.batch("textgen", requests)

    kinds = [type(answer) for answer in asyncio.run(run())]
    assert kinds == [TextGenerationResponse, InvalidRequest, TextGenerationResponse]  # a ClientError, and more precise


def test_every_contract_type_and_error_is_importable_from_sheaf() -> None:
    import sheaf
    import sheaf.api
    import sheaf.exceptions

    errors = [
        name
        for name, value in vars(sheaf.exceptions).items()
        if isinstance(value, type) and issubclass(value, sheaf.exceptions.SheafError)
    ]
    for name in [*sheaf.api.__all__, *errors]:
        assert name in sheaf.__all__, name
        assert getattr(sheaf, name) is getattr(sheaf.api if name in sheaf.api.__all__ else sheaf.exceptions, name)
    readme = (ROOT / "README.md").read_text()
    imports = re.findall(r"^from sheaf import .+$", readme, flags=re.MULTILINE)
    assert imports  # the README's examples import from sheaf itself
    for line in imports:
        exec(line, {})  # the README's own import lines


def forecast_of(entity: str, view: str = "series_history") -> ForecastRequest:
    ref = FeatureRef(feature_view=view, feature_name="values", entity_key="series_id", entity_value=entity)
    return ForecastRequest(feature_ref=ref, horizon=4)


def test_a_refused_field_raises_invalid_request_sync_and_async(server: Server) -> None:
    too_long = request(max_new_tokens=31000)  # over the deployment's limit of 30000: the backend refuses it
    with SheafClient(server.url) as client:
        refused = [capture(lambda: client.predict("textgen", too_long))]
        refused.append(capture(lambda: list(client.stream("textgen", too_long))))
        (_, batched) = client.batch("textgen", [request(), too_long])
        # Sent unvalidated, so that the server's validation refuses it.
        malformed = ForecastRequest(history=[1.0]).model_copy(update={"horizon": 0})
        invalid = capture(lambda: client.predict("forecast", malformed))

    async def run() -> list[BaseException]:
        async with AsyncSheafClient(server.url) as client:
            return [
                await acapture(client.predict("textgen", too_long)),
                await acapture(consume(client.stream("textgen", too_long))),
            ]

    refused += asyncio.run(run())
    for error in [*refused, batched]:
        assert isinstance(error, InvalidRequest) and isinstance(error, ClientError), repr(error)
        assert error.status_code == 422
        assert error.field == "max_new_tokens" and "30000" in error.message
        assert str(error).startswith("max_new_tokens: ")
    assert isinstance(invalid, InvalidRequest) and invalid.status_code == 422 and invalid.field == "horizon"
    assert not isinstance(invalid, FeatureLookupError)


def test_an_unknown_feature_entity_raises_feature_lookup_error_sync_and_async(server: Server) -> None:
    unknown = forecast_of("no-such-series")
    with SheafClient(server.url) as client:
        caught = [capture(lambda: client.predict("forecast", unknown))]
        caught.append(capture(lambda: list(client.stream("forecast", unknown))))
        (batched,) = client.batch("forecast", [unknown])
        bad_view = capture(lambda: client.predict("forecast", forecast_of("sales", view="no_such_view")))

    async def run() -> list[BaseException]:
        async with AsyncSheafClient(server.url) as client:
            return [
                await acapture(client.predict("forecast", unknown)),
                await acapture(consume(client.stream("forecast", unknown))),
            ]

    caught += asyncio.run(run())
    for error in [*caught, batched]:
        assert isinstance(error, FeatureEntityNotFound), repr(error)
        assert isinstance(error, FeatureLookupError) and isinstance(error, ClientError)
        assert error.status_code == 404 and error.field == "feature_ref"
        assert "series_id=no-such-series" in str(error) and "no value" in error.message
    # A ref naming no view is the caller's mistake: a 422 that is a FeatureLookupError and an InvalidRequest.
    assert isinstance(bad_view, FeatureRefInvalid) and isinstance(bad_view, InvalidRequest)
    assert isinstance(bad_view, FeatureLookupError) and bad_view.status_code == 422
    assert "no_such_view" in str(bad_view)


def test_an_unknown_deployment_is_a_client_error_naming_the_ones_there(server: Server) -> None:
    with SheafClient(server.url) as client:
        with pytest.raises(ClientError) as unknown:
            client.predict("nosuch", request())
        with pytest.raises(ClientError) as unknown_stream:
            list(client.stream("nosuch", request()))
    for error in (unknown.value, unknown_stream.value):
        assert error.status_code == 404
        assert error.detail == "no deployment named 'nosuch'; these exist: flux, forecast, textgen, whisper"


def capture(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


async def acapture(awaitable: Awaitable[object]) -> BaseException:
    try:
        await awaitable
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


async def consume(events: AsyncIterator[object]) -> None:
    async for _ in events:
        pass


class OneWrite(http.server.BaseHTTPRequestHandler):
    """Answers every stream with two tokens and an error in one write, as a busy server's relay does
    (the real server coalesces only under load, so this stands in for that moment)."""

    BODY = (
        b'data: {"type": "token", "text": "a", "index": 0, "done": false}\n\n'
        b'data: {"type": "token", "text": "b", "index": 1, "done": false}\n\n'
        b'data: {"type": "error", "done": true, "error": "InjectedFault: late", "code": "backend_error"}\n\n'
    )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, *_: Any) -> None:
        pass


def test_events_that_share_a_write_with_an_error_reach_the_caller_before_it_raises() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneWrite)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        received: list[Any] = []
        with SheafClient(url) as client, pytest.raises(StreamError, match="InjectedFault"):
            for event in client.stream("textgen", request()):
                received.append(event)
        assert [event.text for event in received] == ["a", "b"]

        async def read() -> list[Any]:
            got: list[Any] = []
            async with AsyncSheafClient(url) as client:
                with pytest.raises(StreamError, match="InjectedFault"):
                    async for event in client.stream("textgen", request()):
                        got.append(event)
            return got

        assert [event.text for event in asyncio.run(read())] == ["a", "b"]
    finally:
        server.shutdown()
