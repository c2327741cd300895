"""A tiny random multilingual Whisper in CTranslate2 format, built offline in seconds.

faster-whisper loads it exactly like a real converted checkpoint: the vocabulary has the
real multilingual layout (51865 ids: text tokens, `<|endoftext|>` at 50257, 99 language
tokens, task and timestamp tokens), so language detection, translation, prompts and word
timestamps all run through the real code paths; only the weights are random and tiny.
Used as a config `build:` source: `tiny.whisper:build_tiny_whisper`.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The multilingual Whisper layout (tiny ... large-v2). CTranslate2 treats a model as multilingual
# only when its special tokens sit at these ids, and faster-whisper detects the language only then.
VOCAB_SIZE = 51865
LANGUAGES = 99  # large-v3 adds `yue` (a 100th) and shifts every later id by one
EMPTY_TOKEN_ID = 50256  # the last text id: the empty string in the real vocabulary
SPECIAL_TOKENS_BEFORE_LANGUAGES = ["<|endoftext|>", "<|startoftranscript|>"]
SPECIAL_TOKENS_AFTER_LANGUAGES = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]

_SENTENCES = [
    "The weather is nice today, so we will walk to the park.",
    "Please send the report to my office before noon on Friday.",
    "My brother bought a new car last week and drove it to the city.",
    "The children are playing in the garden while their mother reads a book.",
    "Thank you very much for your help with the project.",
    "It is important to drink water and sleep well every night.",
    "Where is the station? Can you help me? How are you today?",
    "Bonjour, comment allez-vous? Guten Morgen! Buenos días, señor.",
]


def build_tiny_whisper(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random multilingual Whisper for faster-whisper to `dest`; return `dest`.

    `dest` may exist (empty). The same seed gives the same files (8.8 MB). About 3.5 s in a fresh
    process, nearly all of it importing transformers and the converter; the build itself takes 0.3 s.
    """
    import ctranslate2
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

    tokenizer = _tokenizer(seed)
    ids = {token: _token_id(tokenizer, token) for token in _special_tokens()}
    language_ids = {f"<|{code}|>": ids[f"<|{code}|>"] for code in _language_codes()}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,  # faster-whisper's feature extractor default, as in every Whisper but large-v3
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s of features after the encoder's stride-2 convolution
        max_target_positions=448,  # faster-whisper's fixed max_length
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        begin_suppress_tokens=[220, eot],
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=[],
        begin_suppress_tokens=[220, eot],
        lang_to_id=language_ids,  # the converter takes the language ids from here
        alignment_heads=[[1, 0], [1, 1]],  # word timestamps read these cross-attention heads
        is_multilingual=True,
    )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-whisper-hf-") as staging:
        model.save_pretrained(staging)
        wrapped.save_pretrained(staging)
        tokenizer.save(str(Path(staging) / "tokenizer.json"))  # the exact file faster-whisper will read
        converter = ctranslate2.converters.TransformersConverter(staging, copy_files=["tokenizer.json"])
        converter.convert(str(dest), quantization="float32", force=True)  # force: `dest` may exist, empty
    _check_vocabulary(dest)
    return dest


def _language_codes() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES as NAMES  # ordered as the token ids

    return list(NAMES)[:LANGUAGES]


def _special_tokens() -> list[str]:
    languages = [f"<|{code}|>" for code in _language_codes()]
    return [*SPECIAL_TOKENS_BEFORE_LANGUAGES, *languages, *SPECIAL_TOKENS_AFTER_LANGUAGES]


def _tokenizer(seed: int) -> Tokenizer:
    """A byte-level BPE learned on a few sentences, padded with filler words to Whisper's id layout."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    trainer = BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    learner = Tokenizer(BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rng = random.Random(seed)
    corpus = [rng.choice(_SENTENCES) for _ in range(400)]
    learner.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(learned["vocab"])
    # Filler words up to the last text id: random weights pick ids anywhere in the vocabulary, and
    # these decode as readable pseudo-words (" ab", "ab", " ac" ...), never as an unknown id.
    for word in _filler_words(vocab):
        if len(vocab) == EMPTY_TOKEN_ID:
            break
        vocab[word] = len(vocab)
    # The trap: the real multilingual vocabulary has an empty-string token at 50256. Without an id
    # there, every later id shifts down by one and CTranslate2 silently treats the model as English-only
    # (tried: language detection then always answers `en`).
    vocab[""] = EMPTY_TOKEN_ID
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in learned["merges"]]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_special_tokens())  # take ids 50257 on, in order
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise RuntimeError(f"the tiny tokenizer lacks {token}")
    return found


def _filler_words(taken: dict[str, int]) -> Iterator[str]:
    """' ab', 'ab', ' ac' ... as byte-level strings (`Ġ` is the space), skipping the ones already learned."""
    for size in itertools.count(2):
        for letters in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=size):
            for word in ("Ġ" + "".join(letters), "".join(letters)):
                if word not in taken:
                    yield word


def _check_vocabulary(dest: Path) -> None:
    """Fail the build, not a later request, when the converted ids drift from the Whisper layout."""
    config = json.loads((dest / "config.json").read_text())
    vocabulary = json.loads((dest / "vocabulary.json").read_text())
    if len(vocabulary) != VOCAB_SIZE or vocabulary[EMPTY_TOKEN_ID] != "":
        raise RuntimeError(f"{dest}: vocabulary has {len(vocabulary)} ids; expected {VOCAB_SIZE} in Whisper's layout")
    if vocabulary[EMPTY_TOKEN_ID + 1] != "<|endoftext|>":
        raise RuntimeError(f"{dest}: <|endoftext|> is not at id {EMPTY_TOKEN_ID + 1}")
    if config.get("lang_ids") != list(range(EMPTY_TOKEN_ID + 3, EMPTY_TOKEN_ID + 3 + LANGUAGES)):
        raise RuntimeError(f"{dest}: the language ids are not Whisper's {LANGUAGES} ids from {EMPTY_TOKEN_ID + 3} on")
