"""Property-based fuzzing of every deployment's `/predict`, `/stream` and `/batch` against a real `bentoml serve`.

Three kinds of bodies go to every route of every deployment of the session `server` (to `/batch`
as lists of up to one more request than its `max_batch_size`):

- valid-ish: drawn from the request model's own JSON schema, its bounds tightened so that each
  request stays cheap (a few tokens, steps, pixels, samples), half of them nudged toward rules the
  schema cannot say (exactly one of two fields); nothing is filtered out for failing;
- arbitrary JSON: any value as the whole body, or merged into a valid body as extra fields or in
  place of real ones (wrong types, NaN and infinities, 5000-digit integers, control characters,
  lone surrogates);
- raw bytes: not JSON, truncated JSON, invalid UTF-8, deep nesting; and a valid body under every
  other content type.

`whisper` also gets audio that is random bytes, a WAV header over garbage, empty, too long or a
short real WAV, and `forecast` gets `feature_ref`s that name random things, or the real view and
feature with unknown (or known) entities. What the fuzzing found is also sent as found.

Whatever the body, the answer must follow the wire contract: never a 5xx (a 503 with
`Retry-After` only if the service then recovers; a 504 only past the request's own `timeout_s`),
never a hang, 4xx as JSON `{"detail": ...}` (a 422's naming a location), a stream of strict
`data: {json}` frames ending in exactly one terminal event, and a 200 with every response field.
The last tests check that every deployment still answers as it did before the fuzzing.

The examples are derandomized and hypothesis keeps no database, so every run sends the same
bodies; a failure names its example, and the server's log tail comes with the assertion.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import struct
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from pydantic import ValidationError

from sheaf.api import (
    BaseRequest,
    DiffusionRequest,
    ForecastRequest,
    TextGenerationRequest,
    TranscriptionRequest,
)
from sheaf.api.events import PROGRESS_EVENTS
from tests.conftest import Server, speak

REQUEST_TIMEOUT_S = 60.0
"""No request, stream included (heartbeats do not count as progress), may take longer than this."""

RECOVERY_S = 60.0
"""How long a service that answered 503 with `Retry-After` gets to serve normally again."""

ROUTES = ("predict", "stream", "batch")


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible (derandomized, no example database) and sized so the whole file stays within a few minutes."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- the deployments ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    name: str
    request_model: type[BaseRequest[Any]]
    max_batch_size: int  # as tests/conftest.py configures it
    progress_type: str | None  # the type of the events before a stream's terminal one
    normal: dict[str, Any]  # a cheap, valid body
    bounds: dict[str, dict[str, Any]]  # per property: bounds that keep a schema-drawn request cheap
    shape: Callable[[dict[str, Any], str], dict[str, Any]]  # nudges a drawn body (and an audio) toward a valid one

    @property
    def model_type(self) -> str:
        return str(self.request_model.model_fields["model_type"].default)

    @property
    def response_fields(self) -> set[str]:
        return set(self.request_model.response_model.model_fields)

    @property
    def fields(self) -> list[str]:
        return sorted(self.request_model.model_fields)


# Most bodies drawn from a schema break some rule the schema cannot say (exactly one of two fields, one weight
# per adapter). Half of them are nudged toward a valid request, so that the models see plenty of requests too.


def textgen_shape(body: dict[str, Any], audio: str) -> dict[str, Any]:
    if isinstance(body.get("prompt"), str):
        body = {key: value for key, value in body.items() if key != "messages"}
    else:
        body = {key: value for key, value in body.items() if key != "prompt"}
        body["messages"] = body.get("messages") or [{"role": "user", "content": "hello"}]
    return {**body, "stop": [stop for stop in body.get("stop", []) if stop]}


def flux_shape(body: dict[str, Any], audio: str) -> dict[str, Any]:
    adapters = body.get("adapters")
    adapters = sorted(set(adapters)) if adapters is not None else None
    weights = body.get("adapter_weights")
    if weights is not None and len(weights) != len(adapters or []):
        weights = None
    return {**body, "prompt": body["prompt"].strip() or "x", "adapters": adapters, "adapter_weights": weights}


def whisper_shape(body: dict[str, Any], audio: str) -> dict[str, Any]:
    return {**body, "audio_b64": audio, "language": "en", "task": "transcribe"}


def forecast_shape(body: dict[str, Any], audio: str) -> dict[str, Any]:
    history = body.get("history") or [1.0, 2.0, 3.0]
    if any(isinstance(row, list) for row in history):
        body = {**body, "target_index": 0}
        history = [row or [0.0] for row in history]
    levels = [level for level in body.get("quantile_levels", [0.5]) if 0 < level < 1] or [0.5]
    return {**body, "history": history, "feature_ref": None, "quantile_levels": levels}


TEXTGEN = Deployment(
    name="textgen",
    request_model=TextGenerationRequest,
    max_batch_size=16,
    progress_type="token",
    normal={"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 8},
    bounds={"max_new_tokens": {"maximum": 32}},
    shape=textgen_shape,
)
FLUX = Deployment(
    name="flux",
    request_model=DiffusionRequest,
    max_batch_size=8,
    progress_type="progress",
    normal={
        "model_type": "diffusion",
        "prompt": "a lighthouse at dusk",
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
        "seed": 7,
        "adapters": [],
    },
    bounds={
        "height": {"maximum": 64},
        "width": {"maximum": 64},
        "num_inference_steps": {"maximum": 3},
        "preview_every": {"maximum": 3},
        "adapters": {"maxItems": 3, "items": {"enum": ["a", "b", "c"]}},  # "c" is not configured
        "adapter_weights": {"maxItems": 3},
    },
    shape=flux_shape,
)
WHISPER = Deployment(
    name="whisper",
    request_model=TranscriptionRequest,
    max_batch_size=8,
    progress_type="segment",
    normal={"model_type": "audio", "audio_b64": "", "language": "en", "beam_size": 1},  # audio: see Target.normal
    bounds={"beam_size": {"maximum": 5}},
    shape=whisper_shape,
)
FORECAST = Deployment(
    name="forecast",
    request_model=ForecastRequest,
    max_batch_size=32,
    progress_type=None,
    normal={
        "model_type": "time_series",
        "feature_ref": {
            "feature_view": "series_history",
            "feature_name": "values",
            "entity_key": "series_id",
            "entity_value": "temperature",
        },
        "horizon": 12,
        "output_mode": "quantiles",
    },
    bounds={
        "history": {"maxItems": 256},
        "horizon": {"maximum": 64},
        "num_samples": {"maximum": 32},
        "target_index": {"maximum": 4},
        "quantile_levels": {"maxItems": 5},
    },
    shape=forecast_shape,
)
DEPLOYMENTS = {spec.name: spec for spec in (TEXTGEN, FLUX, WHISPER, FORECAST)}
SERIES = ("temperature", "traffic", "sales")


# -- generators -----------------------------------------------------------------------------------------------------

MAX_STRING = 200
MAX_ITEMS = 4  # any list the bounds do not size


def bounded_schema(spec: Deployment) -> dict[str, Any]:
    """The request model's JSON schema with every string, list and costly number bounded."""
    schema = spec.request_model.model_json_schema()
    _bound_all(schema)
    for name, bounds in spec.bounds.items():
        _bound(schema["properties"][name], bounds)
    return schema


def _bound_all(schema: Any) -> None:
    if isinstance(schema, list):
        for item in schema:
            _bound_all(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
        schema["maxLength"] = min(schema.get("maxLength", MAX_STRING), MAX_STRING)
    if schema.get("type") == "array":
        schema["maxItems"] = min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)
    for value in schema.values():
        _bound_all(value)


def _bound(schema: dict[str, Any], bounds: dict[str, Any]) -> None:
    """Apply `bounds` to a property, or to each of its `anyOf` options of a type they fit."""
    for option in schema.get("anyOf", [schema]):
        kind = option.get("type")
        if kind in ("integer", "number") and "maximum" in bounds:
            option["maximum"] = min(option.get("maximum", math.inf), bounds["maximum"])
            option.pop("exclusiveMaximum", None)
        if kind == "array":
            option.update({key: value for key, value in bounds.items() if key != "maximum"})


class Raw(str):
    """JSON text sent as it is: numbers Python's json module would not write, or would write differently."""


SPECIAL_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "1" + "0" * 400, "9" * 5000)
ANY_CHARACTER = st.characters(exclude_categories=())  # control characters and lone surrogates included


def dumps(value: Any, ascii_only: bool = True) -> str:
    """JSON text of `value`, with `Raw` parts written verbatim."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        items = (
            f"{json.dumps(str(key), ensure_ascii=ascii_only)}: {dumps(item, ascii_only)}" for key, item in value.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(item, ascii_only) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@dataclass(frozen=True)
class Body:
    content: bytes
    content_type: str | None = "application/json"
    value: Any = None  # the JSON value sent, when it is one; None for raw bytes

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: the exact bytes
        return f"Body(content={self.content[:2000]!r}, content_type={self.content_type!r})"


def as_body(value: Any, ascii_only: bool = True) -> Body:
    # surrogatepass: a lone surrogate written as UTF-8 is invalid UTF-8, which is fuzz too
    return Body(dumps(value, ascii_only).encode("utf-8", "surrogatepass"), value=value)


def json_bodies(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Body]:
    return st.builds(as_body, values, st.booleans())


def json_leaves(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(SPECIAL_NUMBERS).map(Raw),
        st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "", " ", "0", "-1", "true", "null"]),
        st.text(ANY_CHARACTER, max_size=40),
        st.sampled_from(keys),
    )


def arbitrary_json(keys: list[str]) -> st.SearchStrategy[Any]:
    """Any JSON value; object keys are often the model's own field names."""
    key = st.one_of(st.sampled_from(keys), st.text(ANY_CHARACTER, max_size=12))
    return st.recursive(
        json_leaves(keys),
        lambda children: st.one_of(
            st.lists(children, max_size=MAX_ITEMS), st.dictionaries(key, children, max_size=MAX_ITEMS)
        ),
        max_leaves=12,
    )


def schema_requests(spec: Deployment) -> st.SearchStrategy[dict[str, Any]]:
    schema = bounded_schema(spec)
    # The schema is an object's, so every value drawn is a dict.
    return cast(st.SearchStrategy[dict[str, Any]], from_model_schema(schema, schema.get("$defs", {})))


def from_model_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """`from_schema`, with the objects (requests, chat turns, feature refs) put together here.

    hypothesis-jsonschema 0.23.1 draws objects with a hypothesis internal (`many.more()`) that
    hypothesis 6.170 no longer has, so only the schemas of everything but objects go to it.
    """
    if "$ref" in schema:
        return from_model_schema(defs[schema["$ref"].removeprefix("#/$defs/")], defs)
    if "anyOf" in schema:
        return st.one_of([from_model_schema(option, defs) for option in schema["anyOf"]])
    if schema.get("type") == "object":
        fields = {name: from_model_schema(field, defs) for name, field in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: field for name, field in fields.items() if name in required},
            optional={name: field for name, field in fields.items() if name not in required},
        )
    items = schema.get("items")
    if schema.get("type") == "array" and isinstance(items, dict) and ("$ref" in items or "anyOf" in items):
        return st.lists(
            from_model_schema(items, defs), min_size=schema.get("minItems", 0), max_size=schema.get("maxItems")
        )
    return from_schema(schema)


def wav(frames: bytes, rate: int, channels: int, width: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(frames[: len(frames) - len(frames) % (channels * width)])
    return out.getvalue()


SILENCE_WAV = wav(bytes(16_000), 8000, 1, 2)  # a second
SILENCE = base64.b64encode(SILENCE_WAV).decode()
TOO_LONG_WAV = wav(bytes(2 * 8000 * 31), 8000, 1, 2)  # 31 s of silence: over whisper's max_audio_seconds


def valid_ish(spec: Deployment, audio: str) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies drawn from the schema, half of them nudged toward valid ones (with `audio` or silence)."""
    drawn = schema_requests(spec)
    return st.one_of(drawn, st.builds(spec.shape, drawn, st.sampled_from([audio, SILENCE])))


def broken_requests(spec: Deployment, normal: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Arbitrary JSON alone, or merged into a valid-ish body as extra fields or in place of a real field."""
    keys = spec.fields
    anything = arbitrary_json(keys)
    bases = st.one_of(st.just(normal), valid_ish(spec, normal.get("audio_b64", SILENCE)))
    extra = st.builds(
        lambda base, more: {**base, **more},
        bases,
        st.dictionaries(st.text(ANY_CHARACTER, max_size=12), anything, min_size=1, max_size=3),
    )
    replaced = st.builds(lambda base, field, value: {**base, field: value}, bases, st.sampled_from(keys), anything)
    return st.one_of(anything, extra, replaced)


def batches(items: st.SearchStrategy[Any], spec: Deployment) -> st.SearchStrategy[list[Any]]:
    """Lists of requests for `/batch`: up to one more than the deployment takes."""
    return st.lists(items, max_size=spec.max_batch_size + 1)


# Inside a JSON string: bytes that are not UTF-8 (a lone surrogate written as UTF-8 among them), and escapes of
# lone surrogates, which JSON's grammar allows but which are no text.
BAD_STRINGS = (
    b"\xff",
    b"\x80",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\x00\xfe",
    b"\\ud800",
    b"x\\udfff",
)
CONTENT_TYPES = (
    None,
    "",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/form-data; boundary=xyz",
    "application/json; charset=latin-1",
    "application/xml",
    "image/png",
    "application/json, text/plain",
)


def raw_bodies(spec: Deployment, route: str) -> st.SearchStrategy[Body]:
    """Bytes that are not a well-formed JSON request: random, truncated, invalid text, nested too deep."""
    normal = [spec.normal] if route == "batch" else spec.normal
    text = json.dumps(normal).encode()
    strings = [field for field, value in spec.normal.items() if isinstance(value, str)] + ["model_name", "request_id"]

    def truncated(cut: int) -> Body:
        return Body(text[: cut % len(text)])

    def bad_string(field: str, bad: bytes) -> Body:
        marked = {**spec.normal, field: "@@BAD@@"}
        content = json.dumps([marked] if route == "batch" else marked).encode().replace(b"@@BAD@@", bad)
        return Body(content)

    def nested(depth: int, opener: str) -> Body:
        closer = {"[": "]", '{"a":': "}"}[opener]
        return Body((opener * depth + "1" + closer * depth).encode())

    return st.one_of(
        st.binary(max_size=300).map(Body),
        st.integers(min_value=0).map(truncated),
        st.builds(bad_string, st.sampled_from(strings), st.sampled_from(BAD_STRINGS)),
        st.builds(nested, st.sampled_from([64, 1000, 100_000]), st.sampled_from(["[", '{"a":'])),
        st.sampled_from([b"", b"null", b"{}", b"[]", b"{", b'{"model_type": }', text + b"garbage", text + text]).map(
            Body
        ),
    )


def wav_header(channels: int, rate: int, bits: int, declared: int) -> bytes:
    """A RIFF/WAVE header whose fields may be anything at all."""
    block = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    return b"RIFF" + struct.pack("<I", declared) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data"


def b64_forms(data: bytes) -> st.SearchStrategy[str]:
    plain = base64.b64encode(data).decode()
    return st.sampled_from(
        [
            plain,
            base64.encodebytes(data).decode(),  # with newlines
            base64.urlsafe_b64encode(data).decode(),
            plain.rstrip("="),  # padding lost
            "data:audio/wav;base64," + plain,
            plain + "!",
        ]
    )


def audio_files() -> st.SearchStrategy[bytes]:
    """Random bytes, WAV headers over garbage, empty files, short real WAVs of noise or silence."""
    header = st.builds(
        wav_header,
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from([0, 1, 8, 16, 24, 32, 64, 0xFFFF]),
        st.integers(0, 0xFFFFFFFF),
    )
    real = st.builds(
        wav,
        st.binary(max_size=2 * 16_000),  # noise: up to a second of 16 kHz 16-bit mono
        st.sampled_from([8000, 16_000, 22_050, 44_100, 48_000]),
        st.sampled_from([1, 2]),
        st.sampled_from([1, 2]),
    )
    return st.one_of(
        st.binary(max_size=2000),
        st.builds(lambda head, garbage: head + garbage, header, st.binary(max_size=2000)),
        st.just(b""),
        st.builds(lambda real, cut: real[:cut], real, st.integers(0, 200)),  # a real file, truncated
        real,
        st.sampled_from([SILENCE_WAV, wav(b"", 16_000, 1, 2), TOO_LONG_WAV]),
    )


def audio_requests(audio: str) -> st.SearchStrategy[dict[str, Any]]:
    """Schema-drawn requests with audio that is anything from noise to garbage, and languages it can take."""
    return st.builds(
        lambda base, audio_b64, language, task: {**base, "audio_b64": audio_b64, "language": language, "task": task},
        schema_requests(WHISPER),
        st.one_of(audio_files().flatmap(b64_forms), st.text(max_size=50), st.just(audio)),
        st.sampled_from([None, "en", "EN", " en ", "", "fr", "xx"]),
        st.sampled_from(["transcribe", "transcribe", "translate"]),
    )


def feature_refs() -> st.SearchStrategy[dict[str, Any]]:
    text = st.text(ANY_CHARACTER, max_size=40)
    real = {"feature_view": "series_history", "feature_name": "values", "entity_key": "series_id"}
    return st.one_of(
        st.fixed_dictionaries(dict.fromkeys(("feature_view", "feature_name", "entity_key", "entity_value"), text)),
        st.builds(lambda entity: {**real, "entity_value": entity}, st.one_of(text, st.sampled_from(SERIES))),
        st.builds(
            lambda field, value: {**real, "entity_value": "sales", field: value},
            st.sampled_from(sorted(real)),
            st.one_of(text, st.sampled_from(["series_history", "values", "series_id", "SERIES_HISTORY"])),
        ),
    )


def feature_requests() -> st.SearchStrategy[dict[str, Any]]:
    """Schema-drawn forecasts whose `feature_ref` is random, or real with unknown or known entities."""

    def with_ref(base: dict[str, Any], ref: dict[str, Any], keep_history: bool) -> dict[str, Any]:
        body = {**base, "feature_ref": ref}
        if not keep_history:
            body.pop("history", None)
        return body

    return st.builds(with_ref, schema_requests(FORECAST), feature_refs(), st.sampled_from([False, False, True]))


# -- the checks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    server: Server
    client: httpx.Client
    spoken: str  # base64 of a real clip, for whisper's normal request

    def normal(self, spec: Deployment) -> dict[str, Any]:
        """The deployment's normal (valid, cheap) request."""
        return {**spec.normal, "audio_b64": self.spoken} if spec is WHISPER else spec.normal


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    content: bytes
    elapsed: float

    def json(self) -> Any:
        return strict_json(self.content)


def strict_json(text: str | bytes) -> Any:
    """JSON as the RFC has it: NaN and Infinity, which Python's json reads and writes, are not JSON."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in an answer, which JSON does not have")

    return json.loads(text, parse_constant=refuse)


def post(target: Target, path: str, body: Body) -> Answer:
    """POST and read the whole answer, failing past REQUEST_TIMEOUT_S even while heartbeats keep a stream alive."""
    headers = {"content-type": body.content_type} if body.content_type is not None else {}
    started = time.monotonic()
    chunks = []
    try:
        with target.client.stream("POST", target.server.url + path, content=body.content, headers=headers) as response:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() - started > REQUEST_TIMEOUT_S:
                    raise AssertionError(f"{path}: no end after {REQUEST_TIMEOUT_S} s\n{log_tail(target.server)}")
    except httpx.TransportError as exc:  # a read timeout included
        raise AssertionError(f"{path}: {type(exc).__name__}: {exc}\n{log_tail(target.server)}") from exc
    return Answer(response.status_code, response.headers, b"".join(chunks), time.monotonic() - started)


def log_tail(server: Server, lines: int = 40) -> str:
    """The server log's last lines, without its INFO lines (access log, one per request) but for the very last."""
    recent = server.log_text().splitlines()[-400:]
    kept = [line for line in recent[:-8] if "[INFO]" not in line] + recent[-8:]
    return "server log, last lines (INFO lines left out but for the last 8):\n" + "\n".join(kept[-lines:])


def check(target: Target, spec: Deployment, route: str, body: Body) -> None:
    """Send `body` to one route and hold the answer to the wire contract; a failure carries the server log."""
    answer = post(target, f"/{spec.name}/{route}", body)
    try:
        judge(target, spec, route, body, answer)
    except AssertionError as exc:
        raise AssertionError(
            f"{spec.name}/{route} answered {answer.status}: {answer.content[:1000]!r}\n{exc}\n{log_tail(target.server)}"
        ) from None


def judge(target: Target, spec: Deployment, route: str, body: Body, answer: Answer) -> None:
    if answer.status == 503 and "retry-after" in answer.headers:
        assert_recovers(target, spec)
        return
    if answer.status == 504 and deadline_passed(requests_of(body.value), answer):
        assert_error_body(answer)
        return
    assert answer.status == 200 or 400 <= answer.status < 500, "not a status the contract has for this"
    if answer.status != 200:
        assert_error_body(answer)
    elif route == "predict":
        assert_response(spec, answer.json(), body.value)
    elif route == "stream":
        assert_stream(spec, answer, body)
    else:
        assert_batch(spec, answer, body)


def requests_of(value: Any) -> list[dict[str, Any]]:
    """The request objects of a body, as far as they are objects."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def deadline_passed(requests: list[dict[str, Any]], answer: Answer) -> bool:
    """Whether a 504 (or a stream's `deadline_exceeded`) is what a request asked for with its own `timeout_s`."""
    asked = []
    for request in requests:
        value = request.get("timeout_s")
        if isinstance(value, int | float | Raw) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                asked.append(float(value))
    return any(0 < timeout <= answer.elapsed + 0.05 for timeout in asked)


def assert_error_body(answer: Answer) -> None:
    assert answer.headers.get("content-type", "").startswith("application/json"), "an error that is not JSON"
    payload = answer.json()
    assert isinstance(payload, dict) and "detail" in payload, "an error without `detail`"
    if answer.status == 422:
        assert names_a_location(payload["detail"]), "a 422 whose detail names no field or location"


def names_a_location(detail: Any) -> bool:
    """A 422's detail: a non-empty list of errors, each with a non-empty `loc` and a `msg`."""
    return (
        isinstance(detail, list)
        and bool(detail)
        and all(
            isinstance(error, dict)
            and isinstance(error.get("loc"), list)
            and bool(error["loc"])
            and isinstance(error.get("msg"), str)
            for error in detail
        )
    )


def assert_response(spec: Deployment, payload: Any, sent: Any) -> None:
    """A 200's body: every response field, of its type, for this deployment, echoing the request's id."""
    assert isinstance(payload, dict), "a response that is not an object"
    missing = spec.response_fields - set(payload)
    assert not missing, f"a response without {sorted(missing)}"
    response_model = spec.request_model.response_model
    try:
        response_model.model_validate(payload)
    except ValidationError as exc:
        raise AssertionError(f"not a {response_model.__name__}: {exc}") from None
    assert payload["model_type"] == spec.model_type, "another model_type"
    if isinstance(sent, dict) and isinstance(sent.get("request_id"), str):
        assert payload["request_id"] == sent["request_id"], "another request_id"


def assert_stream(spec: Deployment, answer: Answer, body: Body) -> None:
    """Strict SSE: `data: {json}` frames (comment lines aside), exactly one terminal event, last, nothing after."""
    assert answer.headers.get("content-type", "").startswith("text/event-stream"), "a 200 stream that is not SSE"
    text = answer.content.decode("utf-8")
    assert text.endswith("\n\n"), "the stream ends inside a frame"
    events = []
    for frame in text[:-2].split("\n\n"):
        lines = [line for line in frame.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a heartbeat
        assert len(lines) == 1 and lines[0].startswith("data: "), f"not one data line: {frame!r}"
        event = strict_json(lines[0].removeprefix("data: "))
        assert isinstance(event, dict) and isinstance(event.get("type"), str), f"not an event: {event!r}"
        events.append(event)
    assert events, "a stream without events"
    *progress, last = events
    assert last["type"] in ("result", "error") and last["done"] is True, "the last event is not a terminal one"
    for event in progress:
        assert event["type"] == spec.progress_type and event["done"] is False, f"out of place: {event}"
        try:
            PROGRESS_EVENTS[event["type"]].model_validate(event)
        except ValidationError as exc:
            raise AssertionError(f"not a {event['type']} event: {exc}") from None
    if last["type"] == "error":
        # Nothing here asks a backend to fail: an error event is the request's own deadline, or a crash.
        assert last.get("code") == "deadline_exceeded", "the backend failed mid-stream"
        assert deadline_passed(requests_of(body.value), answer), "a deadline that the request did not set"
        return
    assert_response(spec, {key: value for key, value in last.items() if key not in ("type", "done")}, body.value)


def assert_batch(spec: Deployment, answer: Answer, body: Body) -> None:
    """A 200 batch: one `{"status", "body"}` per request, in order, each held to the contract alone."""
    outcomes = answer.json()
    try:
        sent = json.loads(body.content)  # as the server read it
    except ValueError:
        raise AssertionError("a 200 for a body that is not JSON") from None
    assert isinstance(sent, list) and isinstance(outcomes, list), "a batch answer that is not a list"
    assert len(sent) <= spec.max_batch_size, "more requests than max_batch_size taken"
    assert len(outcomes) == len(sent), "not one outcome per request"
    for index, (outcome, request) in enumerate(zip(outcomes, sent, strict=True)):
        assert isinstance(outcome, dict) and set(outcome) == {"status", "body"}, f"[{index}]: not an outcome"
        status, payload = outcome["status"], outcome["body"]
        if status == 504 and deadline_passed(requests_of(request), answer):
            continue
        assert isinstance(status, int) and 200 <= status < 500, f"[{index}]: status {status}"
        if status == 200:
            assert_response(spec, payload, request)
        else:
            assert isinstance(payload, dict) and "detail" in payload, f"[{index}]: an error without `detail`"
            if status == 422:
                assert names_a_location(payload["detail"]), f"[{index}]: a 422 naming no field or location"


def assert_recovers(target: Target, spec: Deployment) -> None:
    """After a 503 with `Retry-After`, the service must soon be ready and answer a normal predict again."""
    deadline = time.monotonic() + RECOVERY_S
    url = f"{target.server.url}/{spec.name}"
    while time.monotonic() < deadline:
        if (
            target.client.get(f"{url}/ready").status_code == 200
            and target.client.post(f"{url}/predict", json=target.normal(spec)).status_code == 200
        ):
            return
        time.sleep(1)
    raise AssertionError(f"{spec.name} answered 503 and did not recover in {RECOVERY_S} s")


# -- the tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    spoken = speak("Please call me tomorrow.", tmp_path_factory.mktemp("fuzz") / "spoken.wav")
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        yield Target(server, client, base64.b64encode(spoken).decode())


OUTPUT_FIELDS = {"textgen": "text", "flux": "image_b64", "whisper": "text", "forecast": "quantiles"}
"""What each deployment's normal request must answer the same before and after the fuzzing."""


def normal_answer(target: Target, spec: Deployment, tag: str) -> Any:
    """The normal request's answer (with a model name of its own, which the predict cache cannot answer)."""
    response = target.client.post(
        f"{target.server.url}/{spec.name}/predict", json={**target.normal(spec), "model_name": tag}
    )
    assert response.status_code == 200, f"{response.text}\n{log_tail(target.server)}"
    assert_response(spec, response.json(), None)
    return response.json()[OUTPUT_FIELDS[spec.name]]


@pytest.fixture(scope="module")
def before(target: Target) -> dict[str, Any]:
    """Each deployment's answer to its normal request, before any fuzzing (every test asks for it, to come first)."""
    return {name: normal_answer(target, spec, "fuzz-before") for name, spec in DEPLOYMENTS.items()}


# Examples per test (one deployment and route each). On 2 cores the file takes about 1.5 minutes, a third of it
# for the server to start (more while examples fail: hypothesis then shrinks them).
SCHEMA_EXAMPLES = {"textgen": 30, "flux": 25, "whisper": 15, "forecast": 40}
BROKEN_EXAMPLES = 60
RAW_EXAMPLES = 40
AUDIO_EXAMPLES = 30
FEATURE_EXAMPLES = 40


def fuzz(target: Target, spec: Deployment, route: str, bodies: st.SearchStrategy[Body], examples: int) -> None:
    """Send `examples` bodies to one route and check every answer."""

    @fuzz_settings(examples)
    @given(body=bodies)
    def send(body: Body) -> None:
        check(target, spec, route, body)

    send()


def requests_for(spec: Deployment, route: str, requests: st.SearchStrategy[Any]) -> st.SearchStrategy[Body]:
    """One request as the body, or for `/batch` a list of them."""
    return json_bodies(batches(requests, spec) if route == "batch" else requests)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_schema_drawn_requests(target: Target, before: Any, name: str, route: str) -> None:
    spec = DEPLOYMENTS[name]
    fuzz(target, spec, route, requests_for(spec, route, valid_ish(spec, target.spoken)), SCHEMA_EXAMPLES[name])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_arbitrary_json(target: Target, before: Any, name: str, route: str) -> None:
    spec = DEPLOYMENTS[name]
    fuzz(target, spec, route, requests_for(spec, route, broken_requests(spec, target.normal(spec))), BROKEN_EXAMPLES)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_raw_bytes(target: Target, before: Any, name: str, route: str) -> None:
    spec = DEPLOYMENTS[name]
    fuzz(target, spec, route, raw_bodies(spec, route), RAW_EXAMPLES)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_a_valid_body_with_another_content_type(
    target: Target, before: Any, name: str, route: str, content_type: str | None
) -> None:
    spec = DEPLOYMENTS[name]
    value = [target.normal(spec)] if route == "batch" else target.normal(spec)
    check(target, spec, route, Body(json.dumps(value).encode(), content_type, value))


@pytest.mark.parametrize("route", ROUTES)
def test_whisper_audio(target: Target, before: Any, route: str) -> None:
    fuzz(target, WHISPER, route, requests_for(WHISPER, route, audio_requests(target.spoken)), AUDIO_EXAMPLES)


@pytest.mark.parametrize("route", ROUTES)
def test_forecast_feature_refs(target: Target, before: Any, route: str) -> None:
    fuzz(target, FORECAST, route, requests_for(FORECAST, route, feature_requests()), FEATURE_EXAMPLES)


def _forecast(**fields: Any) -> dict[str, Any]:
    return {"model_type": "time_series", **fields}


_REF = {"feature_view": "series_history", "feature_name": "values", "entity_key": "series_id", "entity_value": "sales"}
_FOUND_BODIES: dict[str, tuple[list[str], list[str], bytes | dict[str, Any]]] = {
    # What the fuzzing found answered against the contract, as found, so that it stays checked whatever the generators
    # become: deployments, routes, and the body (bytes as they are, or one request, sent as a list of one to /batch).
    "nul-byte": (list(DEPLOYMENTS), ["batch"], b"\x00"),
    "5000-digit-number": (list(DEPLOYMENTS), ["batch"], b"[" + b"9" * 5000 + b"]"),
    "nested-1000-deep": (list(DEPLOYMENTS), ["batch"], b"[" * 1000 + b"]" * 1000),
    # A lone surrogate, written as the escape \ud800 (JSON text allows it, but it is no character).
    "lone-surrogate-prompt": (["textgen"], ["batch"], {**TEXTGEN.normal, "prompt": "hi \ud800"}),
    "lone-surrogate-flux-prompt": (["flux"], ["batch"], {**FLUX.normal, "prompt": "hi \ud800"}),
    "history-too-large-for-the-model": (["forecast"], list(ROUTES), _forecast(history=[2.6e32])),
    "feature-ref-wrong-entity-key": (["forecast"], list(ROUTES), _forecast(feature_ref={**_REF, "entity_key": "0"})),
    "feature-ref-unknown-view": (["forecast"], list(ROUTES), _forecast(feature_ref={**_REF, "feature_view": "0"})),
}
FOUND = [
    pytest.param(name, route, body, id=f"{case}-{name}-{route}")
    for case, (names, routes, body) in _FOUND_BODIES.items()
    for name in names
    for route in routes
]


@pytest.mark.parametrize(("name", "route", "body"), FOUND)
def test_bodies_the_fuzzing_found(target: Target, before: Any, name: str, route: str, body: Any) -> None:
    spec = DEPLOYMENTS[name]
    if isinstance(body, dict):
        check(target, spec, route, as_body([body] if route == "batch" else body))
    else:
        check(target, spec, route, Body(body))


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_every_deployment_still_serves_as_before(target: Target, before: dict[str, Any], name: str) -> None:
    url = f"{target.server.url}/{name}"
    assert target.client.get(f"{url}/health").json() == {"status": "ok"}
    ready = target.client.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": name}
    after = normal_answer(target, DEPLOYMENTS[name], "fuzz-after")
    assert after == before[name], f"{name} answers its normal request differently after the fuzzing"
