"""Tiny random models built offline in seconds, for tests and benchmarks.

They have real architectures, tokenizers and chat templates, so the code that
serves them is the code that serves real checkpoints; only the weights are random.
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"

# ChatML, the format most small instruction-tuned models (SmolLM2 among them) use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SUBJECTS = [
    "the cat",
    "a dog",
    "my sister",
    "the old man",
    "a teacher",
    "the small bird",
    "our neighbour",
    "the river",
    "a young girl",
    "the farmer",
    "my brother",
    "the doctor",
    "a tired horse",
    "the children",
    "every student",
]
_VERBS = [
    "sees",
    "likes",
    "paints",
    "follows",
    "finds",
    "carries",
    "remembers",
    "watches",
    "builds",
    "sells",
    "opens",
    "reads",
    "writes",
    "cleans",
    "visits",
    "loves",
    "brings",
    "forgets",
    "wants",
    "needs",
]
_OBJECTS = [
    "a red house",
    "the blue car",
    "three green apples",
    "the quiet city",
    "a long letter",
    "the morning sun",
    "an old book",
    "the yellow window",
    "some fresh bread",
    "a heavy basket",
    "the garden gate",
    "two white boats",
]
_PLACES = [
    "in the park",
    "near the station",
    "under the bridge",
    "at home",
    "by the sea",
    "after school",
    "today",
    "before dinner",
    "every morning",
    "on the table",
    "in the kitchen",
    "during the summer",
    "at night",
]
_QUESTIONS = [
    "What is the weather like?",
    "Where is the station?",
    "Can you help me?",
    "How are you today?",
    "Why is the sky blue?",
    "Which train goes north?",
    "Who wrote this letter?",
    "When does the shop open?",
]


def _corpus(lines: int, seed: int) -> list[str]:
    """Plain English-looking sentences, so the BPE merges look like a real vocabulary's."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
        corpus.append(sentence.capitalize())
        corpus.append(rng.choice(_QUESTIONS))
    return corpus


def build_tiny_causal_lm(dest: Path, *, vocab_size: int = 1024, context: int = 512, seed: int = 0) -> Path:
    """Write a tiny random Llama with a byte-level BPE tokenizer and a chat template to `dest`; return `dest`.

    The same arguments give the same files. `vocab_size` is a ceiling: the small corpus
    yields about 580 tokens (256 bytes, the special tokens and its merges). The EOS row of
    the output layer is zeroed, so EOS has logit 0 while the others are spread around it:
    greedy decoding practically never stops early, and sampling stops only now and then.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(3000, seed), vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",  # set here: an attribute changed after construction is not saved
        chat_template=CHAT_TEMPLATE,
        model_max_length=context,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
