"""How a batch's rows pick and end their tokens: one request's progress through generate (`Decoding`),
its own sampling (`Sampling`), the logits processor and stopping criteria that apply them row by row
(`RowSampler`, `RowStopper`), and the streamer that releases each row's settled text as it comes (`RowsStreamer`).

A row's text never ends in part of a character (a trailing incomplete UTF-8 sequence is held back),
and a stream also holds back what could be the start of a stop string until later tokens settle it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from sheaf.api.textgen import TextGenerationRequest
from sheaf.exceptions import InvalidRequest

logger = logging.getLogger("sheaf.backends.sampling")


class Decoding:
    """One request's progress through generate: its new tokens, its text, and why it finished."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        request: TextGenerationRequest,
        prompt_ids: list[int],
        eos_ids: frozenset[int],
        sampling: Sampling,
    ) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.tokens: list[int] = []
        self.finish_reason: Literal["stop", "length"] | None = None
        self.failure: Exception | None = None  # this row's own work failed: its outcome, and it takes no more tokens
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._stop_at: int | None = None  # where the first stop string begins in the decoded text
        self._settled = 0  # how much of the decoded text no later token changes: scanned for stops already
        self._longest_stop = max(map(len, request.stop), default=0)
        self._decoded = (0, "")  # (token count, text) of the last decode

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.failure is not None

    def fail(self, exc: Exception) -> None:
        logger.warning("request %s failed alone: %s: %s", self.request.request_id, type(exc).__name__, exc)
        self.failure = exc

    def push(self, token: int) -> bool:
        """Take the row's next token; True once the row has finished (later tokens are padding)."""
        if self.done:
            return True
        if token in self._eos_ids:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        if self.request.stop:
            self._scan_for_stops()
        if self._stop_at is not None:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _scan_for_stops(self) -> None:
        """Look for a stop string only where one could still begin: it must end in the text the last token changed."""
        full = self.full_text()
        self._stop_at = _first_stop(full, self.request.stop, max(0, self._settled - self._longest_stop + 1))
        self._settled = len(_complete(full))  # a trailing partial character may yet decode differently

    def full_text(self) -> str:
        if self._decoded[0] != len(self.tokens):
            self._decoded = (len(self.tokens), self._decode(self.tokens))
        return self._decoded[1]

    def text(self) -> str:
        """The text so far, cut before the first stop string, without a trailing partial character."""
        full = self.full_text()
        return _complete(full if self._stop_at is None else full[: self._stop_at])

    def completion_tokens(self) -> int:
        """Tokens up to the cut: the fewest leading tokens whose text reaches it (best effort)."""
        if self._stop_at is None:
            return len(self.tokens)
        count = len(self.tokens)
        while count > 0 and len(self._decode(self.tokens[: count - 1])) >= self._stop_at:
            count -= 1
        return count

    def _decode(self, tokens: list[int]) -> str:
        # No clean-up of spaces: it rewrites text already decoded (" ." -> "."), and a stream
        # must be able to send a text's beginning before its end is known.
        return str(self._tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@dataclass
class Sampling:
    """How one row picks its tokens; its own generator keeps it independent of the batch."""

    temperature: float
    top_p: float
    generator: torch.Generator

    @classmethod
    def of(cls, request: TextGenerationRequest) -> Sampling:
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            try:
                generator.manual_seed(request.seed)
            except (ValueError, RuntimeError, OverflowError) as exc:  # out of the generator's range
                raise InvalidRequest("seed", f"cannot seed a random generator with it: {exc}") from exc
        return cls(request.temperature, request.top_p, generator)

    def pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.to("cpu", torch.float64) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        # Inverse CDF in vocabulary order: a batch's slightly different rounding moves the bounds
        # by a hair, where sorting by probability could swap two near-equal tokens outright.
        cumulative = torch.cumsum(probs, dim=0)
        draw = torch.rand((), generator=self.generator, dtype=torch.float64) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, draw, right=True)), probs.numel() - 1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p."""
    ordered, order = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(ordered, dim=0) - ordered
    kept = probs.clone()
    kept[order[mass_before >= top_p]] = 0.0
    return kept


class RowSampler(LogitsProcessor):
    """Chooses each row's next token itself and masks every other token, so greedy generate takes it.

    A finished row gets padding (generate pads it anyway); a row whose pick fails is failed alone.
    """

    def __init__(self, rows: Sequence[Decoding], pad_id: int) -> None:
        self._rows = rows
        self._pad_id = pad_id

    def _pick(self, row: Decoding, logits: torch.Tensor) -> int:
        if row.done:
            return self._pad_id
        try:
            return row.sampling.pick(logits)
        except Exception as exc:
            row.fail(exc)
            return self._pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        picks = [self._pick(row, logits) for row, logits in zip(self._rows, scores, strict=True)]
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(picks), device=scores.device), torch.tensor(picks, device=scores.device)] = 0.0
        return forced


class RowStopper(StoppingCriteria):
    """Feeds each row its new token and reports which rows are finished; all of them once `halt()` says so."""

    def __init__(self, rows: Sequence[Decoding], halt: Callable[[], bool]) -> None:
        self._rows = rows
        self._halt = halt

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        finished = [_push(row, token) for row, token in zip(self._rows, input_ids[:, -1].tolist(), strict=True)]
        if self._halt():
            finished = [True] * len(finished)
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def _push(row: Decoding, token: int) -> bool:
    """`row.push(token)`; a failure of this row's own decoding or stop scan fails the row alone."""
    try:
        return row.push(token)
    except Exception as exc:
        row.fail(exc)
        return True


class RowsStreamer(BaseStreamer):
    """Runs in the generate thread: after each step, hands each row's newly settled text to
    `release(row, piece)`, and calls `finished(row)` once, as soon as the row is done (its
    batch-mates go on), or at `finish()` for a row that generate left unfinished.

    Text is held back while it ends in an incomplete character or could be the start of a stop
    string; a finished row's is released whole.
    """

    def __init__(
        self, rows: Sequence[Decoding], release: Callable[[int, str], None], finished: Callable[[int], None]
    ) -> None:
        self.released = ["" for _ in rows]
        self._rows = rows
        self._release = release
        self._finished = finished
        self._ended = [False for _ in rows]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        for row in range(len(self._rows)):
            if not self._ended[row]:
                self._settle(row, final=False)

    def end(self) -> None:
        """Nothing to do: whoever runs generate calls `finish` once it has returned."""

    def finish(self) -> None:
        """Release what every unfinished row still holds, and finish it."""
        for row in range(len(self._rows)):
            if not self._ended[row]:
                self._settle(row, final=True)

    def _settle(self, row: int, final: bool) -> None:
        decoding = self._rows[row]
        if decoding.failure is None:
            text = decoding.text()  # `RowStopper` has already taken this step's token; no partial character
            done = final or decoding.done
            end = len(text) if done else len(text) - _stop_prefix(text, decoding.request.stop)
            released = self.released[row]
            if end > len(released) and text.startswith(released):
                self.released[row] += text[len(released) : end]
                self._release(row, text[len(released) : end])
            if not done:
                return
        self._ended[row] = True
        self._finished(row)


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first of `stops` begins in `text`, looking from `start` on."""
    found = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return min(found, default=None)


def _complete(text: str) -> str:
    """`text` without a trailing incomplete character, which decoding writes as U+FFFD.

    (A U+FFFD that the model really wrote last goes too: the two cannot be told apart there.)
    """
    return text.rstrip("\ufffd")


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the start of a stop string: it must wait for the next token."""
    held = 0
    for stop in stops:
        start = max(0, len(text) - len(stop) + 1)
        at = text.find(stop[0], start)
        while at >= 0 and len(text) - at > held:
            if stop.startswith(text[at:]):
                held = len(text) - at
                break
            at = text.find(stop[0], at + 1)
    return held
