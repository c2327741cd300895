"""Text generation with a transformers causal LM: batched continuously, sampled per request, streamed.

Sheaf runs its own decoding loop over one KV cache (`sheaf.backends.decode_batch`) rather than
`model.generate`, so that streams can join a running batch at a token boundary and every row
can leave it at its own: each row picks its next token with its own temperature, top_p and
random generator and ends at its own max_new_tokens, stop strings or EOS
(`sheaf.backends.sampling`). So a request's text does not depend on which other requests
shared its batch: the same seed gives the same text. A row whose own work fails (its
sampling, its decoding) ends there with its error as its outcome; the rest of its batch goes on.

Text never ends in part of a character: while the last tokens are an incomplete UTF-8
sequence, that piece is held back, and a reply that ends inside a character (at its token
limit, a cancel or EOS) drops it, in a stream and a predict alike.

A package's GGUF checkpoint is converted once into a transformers folder (`sheaf.backends.gguf`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sheaf.api.events import ResultEvent, TokenEvent
from sheaf.api.textgen import TextGenerationRequest, TextGenerationResponse
from sheaf.backends.base import Arrivals, BatchBackend, Cancelled, Emit, elapsed_ms, loaded, torch_device
from sheaf.backends.decode_batch import DecodeBatch
from sheaf.backends.gguf import converted_gguf
from sheaf.backends.sampling import Decoding, Sampling
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.options import TextGenerationOptions
from sheaf.weights import find_in_package, weights_location

logger = logging.getLogger("sheaf.backends.textgen")

FinishReason = Literal["stop", "length", "cancelled"]


class _Row:
    """A request in the running batch: its decoding, the index its events go to, and its cancel."""

    def __init__(self, index: int, decoding: Decoding, cancel: threading.Event, streaming: bool = True) -> None:
        self.index = index
        self.decoding = decoding
        self.cancel = cancel
        self.streaming = streaming  # False: a predict, which needs no token events
        self.sent = 0  # token events
        self.started = time.perf_counter()  # reset when it joins the batch
        self.batch_size = 0  # the most rows it decoded beside, itself included

    @property
    def listening(self) -> bool:
        """Whether its stream still wants text: it streams, has not left, and its own work has not failed."""
        return self.streaming and not self.cancel.is_set() and self.decoding.failure is None


class TextGenerationBackend(BatchBackend[TextGenerationRequest, TextGenerationResponse, Decoding]):
    options_model = TextGenerationOptions
    joins_running = True  # streams join a running batch at a token boundary (`DecodeBatch`)

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: TextGenerationOptions = self.options()
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context = 0
        self._max_prompt_chars = 0

    @property
    def model(self) -> PreTrainedModel:
        return loaded(self._model)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return loaded(self._tokenizer, "the tokenizer")

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        weights = self._weights_location()
        tokenizer = AutoTokenizer.from_pretrained(weights)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, self.config.dtype))
        model.to(torch_device(self.config.device))  # type: ignore[arg-type]  # transformers wraps `to` untyped
        model.eval()  # type: ignore[no-untyped-call]
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{weights}: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self._eos_ids = _eos_ids(model, tokenizer)
        self._context = _context_length(model, tokenizer)
        # No token stands for more characters than its vocabulary entry has, so a longer text cannot fit.
        self._max_prompt_chars = self._context * _longest_token(tokenizer)
        self._model, self._tokenizer = model, tokenizer
        logger.info(
            "loaded %s from %s on %s in %.1f s", self.config.name, weights, model.device, elapsed_ms(started) / 1000
        )

    def _weights_location(self) -> str:
        """A folder or hub id that from_pretrained reads; a package's GGUF file is converted once into the cache,
        and a builder's weights are built once there."""
        source = self.config.model
        if (location := weights_location(source)) is not None:
            return location
        assert source.package is not None  # a ModelSource names exactly one source
        found = find_in_package(source.package, source.file or "*.gguf")
        if found.is_dir():
            return str(found)
        if found.suffix != ".gguf":
            raise ValueError(f"{found}: expected a .gguf file or a model folder inside package {source.package}")
        return str(converted_gguf(source.package, found))

    # -- requests ----------------------------------------------------------------------------

    def predict(self, rows: Sequence[Decoding], cancel: threading.Event) -> list[TextGenerationResponse | Exception]:
        outcomes: list[TextGenerationResponse | Exception] = [RuntimeError("no outcome")] * len(rows)

        def finished(row: _Row) -> None:
            outcomes[row.index] = row.decoding.failure or self._result(row)

        self._decode([_Row(index, decoding, cancel) for index, decoding in enumerate(rows)], finished)
        if cancel.is_set():  # rows cut short have no answer; whoever cancelled answers the batch
            tokens = max(len(row.tokens) for row in rows)
            logger.info("predict batch of %d cancelled after %d tokens", len(rows), tokens)
            raise Cancelled(f"generation stopped after {tokens} tokens")
        return outcomes

    def stream_batch(
        self,
        requests: Sequence[TextGenerationRequest],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,
        streaming: Sequence[bool] | None = None,
    ) -> None:
        """One decoding batch: each row's settled text goes to its stream as a token event at every
        step, and its result as soon as it ends (at its own max_new_tokens, stop string or EOS) while
        the others go on. Streams from `arrivals` join at a token boundary as rows end and make room;
        decoding stops once every row has ended or left and nobody is arriving."""
        rows, where = self.prepare_streams(requests, emit)
        seated = [
            _Row(index, decoding, cancels[index], streaming is None or streaming[index])
            for decoding, index in zip(rows, where, strict=True)
        ]

        def release(row: _Row, piece: str) -> None:
            emit(row.index, TokenEvent(text=piece, index=row.sent))
            row.sent += 1

        def finished(row: _Row) -> None:
            decoding = row.decoding
            if decoding.failure is not None:  # this row's own sampling or decoding failed, or the model call
                emit(row.index, decoding.failure)
            elif decoding.finish_reason is None or row.cancel.is_set():
                _log_cancelled(decoding)
            else:
                emit(row.index, ResultEvent(response=self._result(row)))

        def arrived(room: int) -> list[_Row]:
            joining: list[_Row] = []
            for arrival in arrivals.take(room) if arrivals is not None else []:
                prepared = self._prepared(arrival.request)  # type: ignore[arg-type]  # only this backend's requests
                if isinstance(prepared, Exception):
                    emit(arrival.index, prepared)
                else:
                    joining.append(_Row(arrival.index, prepared, arrival.cancel, arrival.streaming))
            return joining

        if seated or arrivals is not None:
            self._decode(seated, finished, release, arrived if arrivals is not None else None)

    def _decode(
        self,
        rows: list[_Row],
        finished: Callable[[_Row], None],
        release: Callable[[_Row, str], None] | None = None,
        arrived: Callable[[int], list[_Row]] | None = None,
    ) -> None:
        """Decode `rows` together, one token each per step, until every one has ended or left; each
        one's settled text goes to `release` as it comes, and the row to `finished` once it ends. At
        each step the rows `arrived(room)` returns join, up to `max_batch_size` rows in all."""
        batch = DecodeBatch(self.model, self.tokenizer.pad_token_id)
        active: list[_Row] = []
        joining = rows
        logits: torch.Tensor | None = None
        room = self.config.batching.max_batch_size
        try:
            while True:
                if arrived is not None and batch.can_join:
                    joining = joining + arrived(room - len(active) - len(joining))
                if joining:
                    started = time.perf_counter()
                    for row in joining:
                        row.started = started
                    joined = batch.add([row.decoding.prompt_ids for row in joining])
                    logits = joined if logits is None else torch.cat([logits, joined])
                    active, joining = active + joining, []
                if not active or logits is None:
                    return
                ended = []
                for row, row_logits in zip(active, logits, strict=True):
                    row.batch_size = max(row.batch_size, len(active))
                    ended.append(row.cancel.is_set() or row.decoding.take(row_logits))
                    if release is not None and row.listening and (piece := row.decoding.release()):
                        release(row, piece)
                    if ended[-1]:
                        finished(row)
                going = [position for position, end in enumerate(ended) if not end]
                batch.keep(going)
                active = [active[position] for position in going]
                logits = batch.step([row.decoding.tokens[-1] for row in active]) if active else None
        except Exception as exc:  # the model call failed: every row still open gets the error
            logger.exception("decoding failed for a batch of %d", len(active) + len(joining))
            for row in active + joining:
                row.decoding.failure = row.decoding.failure or exc
                finished(row)

    def _result(self, row: _Row) -> TextGenerationResponse:
        metadata = {"batch_size": row.batch_size, "inference_ms": elapsed_ms(row.started)}
        return self._response(row.decoding, row.decoding.text(), row.decoding.finish_reason or "length", metadata)

    def quick_check(self, request: TextGenerationRequest) -> bool:
        return _prompt_chars(request) <= QUICK_CHECK_CHARS

    def prepare(self, request: TextGenerationRequest) -> Decoding:
        """The request's row in a decoding batch."""
        prompt_ids = self._encode(request)
        sampling = Sampling.of(request)
        return Decoding(self.tokenizer, request, prompt_ids, self._eos_ids, sampling)

    def _encode(self, request: TextGenerationRequest) -> list[int]:
        """The prompt's token ids; InvalidRequest when this deployment cannot take the request."""
        limit = self._options.max_new_tokens_limit
        if request.max_new_tokens > limit:
            raise InvalidRequest(
                "max_new_tokens", f"{request.max_new_tokens} is above this deployment's limit of {limit}"
            )
        field = "messages" if request.prompt is None else "prompt"
        # Checked before the tokenizer runs, which takes seconds over megabytes of text.
        chars = _prompt_chars(request)
        if chars > self._max_prompt_chars:
            raise InvalidRequest(
                field,
                f"is {chars} characters; no text over {self._max_prompt_chars} characters "
                f"fits the model's context of {self._context} tokens",
            )
        prompt_ids = self._prompt_ids(request)
        if not prompt_ids:
            raise InvalidRequest(field, "is empty once tokenized")
        if len(prompt_ids) >= self._context:
            raise InvalidRequest(field, f"is {len(prompt_ids)} tokens; the model's context is {self._context} tokens")
        if len(prompt_ids) + request.max_new_tokens > self._context:
            raise InvalidRequest(
                "max_new_tokens",
                f"{request.max_new_tokens} new tokens after a {len(prompt_ids)}-token prompt "
                f"exceed the model's context of {self._context} tokens",
            )
        return prompt_ids

    def _prompt_ids(self, request: TextGenerationRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.prompt is not None:
            return list(tokenizer(request.prompt, verbose=False)["input_ids"])  # our own length check speaks
        if not tokenizer.chat_template:
            raise InvalidRequest("messages", "this model has no chat template; send `prompt` instead")
        try:
            rendered = tokenizer.apply_chat_template(
                [message.model_dump() for message in request.messages], tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError as exc:  # templates reject some turn orders or roles with raise_exception()
            raise InvalidRequest("messages", str(exc)) from exc
        # The template writes the model's special tokens itself; adding them again would double the BOS.
        return list(tokenizer(str(rendered), add_special_tokens=False, verbose=False)["input_ids"])

    def _response(
        self, decoding: Decoding, text: str, finish_reason: FinishReason, metadata: dict[str, Any]
    ) -> TextGenerationResponse:
        request = decoding.request
        return TextGenerationResponse(
            request_id=request.request_id,
            model_name=request.model_name,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=len(decoding.prompt_ids),
            completion_tokens=decoding.completion_tokens(),
            metadata=metadata,
        )


def _log_cancelled(decoding: Decoding) -> None:
    logger.info("stream %s cancelled after %d tokens", decoding.request.request_id, len(decoding.tokens))


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token that ends a reply: the checkpoint's generation config may list several."""
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if isinstance(i, int))


def _longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters of text that one token can take: its longest vocabulary entry, added tokens included.

    A byte-level entry has a character per byte and a SentencePiece one a character per character, so
    no entry is shorter than the text it stands for. A normalizer could shorten text first (composing
    accents), so a tokenizer with one gets some room.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return longest * (4 if backend is not None and backend.normalizer is not None else 1)


def _context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(value := getattr(config, key, None), int):
            return value
    # Tokenizers without a real limit report a huge sentinel; only trust a plausible one.
    if tokenizer.model_max_length < 10_000_000:
        return int(tokenizer.model_max_length)
    raise ValueError("cannot tell the model's context length from its config or tokenizer")


QUICK_CHECK_CHARS = 1000
"""Prompts up to this long are checked on the event loop: tokenizing takes about 0.4 µs a character."""


def _prompt_chars(request: TextGenerationRequest) -> int:
    return len(request.prompt) if request.prompt is not None else sum(len(m.content) for m in request.messages)
