"""How a batch's rows pick and end their tokens: one request's progress through decoding (`Decoding`),
with its own sampling (`Sampling`), so that a row's tokens do not depend on its batch-mates.

A row's text never ends in part of a character (a trailing incomplete UTF-8 sequence is held back),
and a stream also holds back what could be the start of a stop string until later tokens settle it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from sheaf.api.textgen import TextGenerationRequest
from sheaf.exceptions import InvalidRequest

logger = logging.getLogger("sheaf.backends.sampling")


class Decoding:
    """One request's progress through decoding: its new tokens, its text, what of it a stream has
    been sent (`released`), and why it finished."""

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
        self.released = ""
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

    def take(self, logits: torch.Tensor) -> bool:
        """Pick the row's next token from its `logits` and take it; True once the row has finished.
        A failure of this row's own sampling, decoding or stop scan fails the row alone."""
        try:
            return self.push(self.sampling.pick(logits))
        except Exception as exc:
            self.fail(exc)
            return True

    def release(self) -> str:
        """The text settled since the last release: all of it once the row is done; before, none
        of an incomplete character or of what could be the start of a stop string."""
        text = self.text()
        end = len(text) if self.done else len(text) - _stop_prefix(text, self.request.stop)
        if end <= len(self.released) or not text.startswith(self.released):
            return ""
        piece = text[len(self.released) : end]
        self.released += piece
        return piece

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
