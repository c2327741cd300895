"""Text generation with a transformers causal LM: batched, sampled per request, streamed.

One `model.generate` call serves a whole batch, yet every row keeps its own settings
(`sheaf.backends.sampling`): `RowSampler` picks each row's next token with that row's temperature, top_p and random
generator (generate itself then only takes the one token left possible), and `RowStopper`
ends each row at its own max_new_tokens, stop strings or EOS. So a request's text does not
depend on which other requests shared its batch: the same seed gives the same text. A row
whose own work fails (its sampling, its decoding) ends there with its error as its outcome;
the rest of its batch goes on.

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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from sheaf.api.events import ResultEvent, TokenEvent
from sheaf.api.textgen import TextGenerationRequest, TextGenerationResponse
from sheaf.backends.base import BatchBackend, Cancelled, Emit, elapsed_ms, loaded, torch_device
from sheaf.backends.gguf import converted_gguf
from sheaf.backends.sampling import Decoding, RowSampler, RowsStreamer, RowStopper, Sampling
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.options import TextGenerationOptions
from sheaf.weights import find_in_package, weights_location

logger = logging.getLogger("sheaf.backends.textgen")

FinishReason = Literal["stop", "length", "cancelled"]


class TextGenerationBackend(BatchBackend[TextGenerationRequest, TextGenerationResponse, Decoding]):
    options_model = TextGenerationOptions
    # A stream that arrived while a long generation ran would wait for all of it: rows cannot join
    # a running generate call at a token boundary yet. Until they can, each stream runs on its own.
    streams_alone = True

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
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{weights}: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self._eos_ids = _eos_ids(model, tokenizer)
        # Sampling happens per row in `RowSampler`: the checkpoint's own defaults (temperature,
        # repetition penalty ...) must not apply on top, so generate gets a neutral config.
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=tokenizer.pad_token_id,
        )
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
        failure: Exception | None = None
        metadata: dict[str, Any] = {"batch_size": len(rows)}
        started = time.perf_counter()
        try:
            self._generate(rows, cancel.is_set)  # `RowStopper` ends every row within a token of cancel
        except Exception as exc:  # the model call failed for every row in it; invalid rows keep their own error
            logger.exception("generate failed for a batch of %d", len(rows))
            failure = exc
        metadata["inference_ms"] = elapsed_ms(started)
        if cancel.is_set():  # rows cut short have no answer; whoever cancelled answers the batch
            tokens = max(len(row.tokens) for row in rows)
            logger.info("predict batch of %d cancelled after %d tokens", len(rows), tokens)
            raise Cancelled(f"generation stopped after {tokens} tokens")
        return [self._outcome(row, failure, metadata) for row in rows]

    def _outcome(
        self, row: Decoding, failure: Exception | None, metadata: dict[str, Any]
    ) -> TextGenerationResponse | Exception:
        if failure is not None:
            return failure
        if row.failure is not None:
            return row.failure
        return self._response(row, row.text(), row.finish_reason or "length", dict(metadata))

    def stream_batch(
        self, requests: Sequence[TextGenerationRequest], cancels: Sequence[threading.Event], emit: Emit
    ) -> None:
        """One generate call for the batch: each row's settled text goes to its stream as a token
        event at every step, and its result as soon as it ends (at its own max_new_tokens, stop
        string or EOS) while the others go on. Generation stops once every row has ended or left."""
        rows, where = self.prepare_streams(requests, emit)
        if not rows:
            return
        listening = [cancels[index] for index in where]
        sent = [0] * len(rows)
        started = time.perf_counter()

        def release(row: int, piece: str) -> None:
            if not listening[row].is_set():
                emit(where[row], TokenEvent(text=piece, index=sent[row]))
                sent[row] += 1

        def finished(row: int) -> None:
            decoding = rows[row]
            if decoding.failure is not None:  # this row's own sampling or decoding failed
                emit(where[row], decoding.failure)
                return
            reason: FinishReason = decoding.finish_reason or "cancelled"
            if reason == "cancelled" or listening[row].is_set():
                _log_cancelled(decoding)
            if not listening[row].is_set():
                metadata = {"batch_size": len(rows), "inference_ms": elapsed_ms(started)}
                emit(
                    where[row], ResultEvent(response=self._response(decoding, streamer.released[row], reason, metadata))
                )

        streamer = RowsStreamer(rows, release, finished)

        def halt() -> bool:
            return all(row.done or cancel.is_set() for row, cancel in zip(rows, listening, strict=True))

        try:
            self._generate(rows, halt, streamer)
        except Exception as exc:  # the model call failed: every row still open gets the error
            logger.exception("generate failed for a batch of %d", len(rows))
            for decoding in rows:
                if not decoding.done:
                    decoding.failure = exc
        streamer.finish()

    def prepare(self, request: TextGenerationRequest) -> Decoding:
        """The request's row for generate."""
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
        chars = len(request.prompt) if request.prompt is not None else sum(len(m.content) for m in request.messages)
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

    def _generate(
        self, rows: Sequence[Decoding], halt: Callable[[], bool] = lambda: False, streamer: BaseStreamer | None = None
    ) -> None:
        """One left-padded generate call for all rows; each row's outcome lands in its `Decoding`."""
        model = self.model
        pad_id = self.tokenizer.pad_token_id
        width = max(len(row.prompt_ids) for row in rows)
        padding = [width - len(row.prompt_ids) for row in rows]
        input_ids = [[pad_id] * pad + row.prompt_ids for pad, row in zip(padding, rows, strict=True)]
        attention_mask = [[0] * pad + [1] * len(row.prompt_ids) for pad, row in zip(padding, rows, strict=True)]
        model.generate(  # type: ignore[operator]  # causal LM classes mix generate into PreTrainedModel
            input_ids=torch.tensor(input_ids, device=model.device),
            attention_mask=torch.tensor(attention_mask, device=model.device),
            max_new_tokens=max(row.request.max_new_tokens for row in rows),
            do_sample=False,  # `RowSampler` leaves a single possible token per row
            logits_processor=LogitsProcessorList([RowSampler(rows, pad_id)]),
            stopping_criteria=StoppingCriteriaList([RowStopper(rows, halt)]),
            streamer=streamer,
        )

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
