"""A text encoder's token limit, checked before the cost: T5 silently drops what is past its
`max_sequence_length`, and tokenising a few megabytes takes seconds."""

from __future__ import annotations

import re
from typing import Any

from sheaf.exceptions import InvalidRequest

# Unicode's White_Space, which the text encoders' tokenizers split words on and drop (Python's `str.isspace`
# also takes the separators U+001C..U+001F, which they keep as characters).
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_WITHOUT_WHITESPACE = str.maketrans("", "", _WHITESPACE)
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")


class PromptLimit:
    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        # No token of the vocabulary spans more characters than its longest piece (whose `▁` stands for the
        # space before a word), so a text longer than the limit's worth of them cannot fit: it is refused
        # before anything tokenises it.
        self.max_chars = max_tokens * max(map(len, tokenizer.get_vocab()))

    def text(self, field: str, text: str) -> str:
        """`text` as the encoder gets it; InvalidRequest naming `field` when it cannot read all of it.

        A text too long to fit is refused by its length, without tokenising it. Runs of whitespace do not
        count (the tokenizers drop them), and a long text has them collapsed to one space before anything
        tokenises it, which gives the same tokens. (The bound still counts characters that a tokenizer drops
        or folds into one unknown token, which the model cannot read anyway.)
        """
        if len(text) > self.max_chars:
            visible = len(text.translate(_WITHOUT_WHITESPACE))  # a C loop: milliseconds for megabytes
            if visible > self.max_chars:
                raise self._too_long(field, f"{visible} characters besides whitespace")
            text = _WHITESPACE_RUN.sub(" ", text)
            if len(text) > self.max_chars:
                raise self._too_long(field, f"{len(text)} characters with each run of whitespace as one")
        tokens = len(self.tokenizer(text, truncation=False)["input_ids"])
        if tokens > self.max_tokens:
            raise InvalidRequest(field, f"is {tokens} tokens; this deployment reads at most {self.max_tokens}")
        return text

    def _too_long(self, field: str, length: str) -> InvalidRequest:
        return InvalidRequest(
            field,
            f"is {length}; this deployment reads at most {self.max_tokens} tokens, "
            f"which never hold more than {self.max_chars}",
        )
