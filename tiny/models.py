"""Tiny random models built offline in seconds, for tests and benchmarks.

They have real architectures, tokenizers and chat templates, so the code that
serves them is the code that serves real checkpoints; only the weights are random.
"""

from __future__ import annotations

import collections
import importlib
import math
import random
import re
import string
from pathlib import Path
from typing import Any

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


# -- FLUX ------------------------------------------------------------------------------------
# A FluxPipeline with every part of the real one (CLIP and T5 text encoders with their own
# tokenizers, the MMDiT transformer, an 8x-downsampling VAE, the flow-matching scheduler),
# each some tens of thousands of parameters, so 20 steps at 64x64 take about 0.1 s on CPU.

_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's fixed ids 0, 1, 2
_CLIP_WIDTH, _T5_WIDTH = 32, 32  # the transformer's pooled_projection_dim and joint_attention_dim
_LATENT_CHANNELS = 4
_LORA_RANK = 4
_LORA_SCALE = 16.0
# The real FLUX.1 VAE's latent normalisation; any values work, but the pipeline requires a shift factor.
_VAE_SCALING, _VAE_SHIFT = 0.3611, 0.1159
_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": _LATENT_CHANNELS * 4,  # latents are packed in 2x2 patches
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_WIDTH,
    "pooled_projection_dim": _CLIP_WIDTH,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
}


def _word_counts(corpus: list[str], pattern: str) -> list[tuple[str, int]]:
    """The corpus's words, most frequent first (ties alphabetical): a fixed order for a fixed corpus."""
    counts = collections.Counter(word for line in corpus for word in re.findall(pattern, line))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _clip_tokenizer(corpus: list[str]) -> Any:
    """A CLIP BPE: the byte alphabet, each byte ending a word (`</w>`), and merges that build the corpus's words.

    Written out rather than trained: the `tokenizers` trainers break ties in hash order, which
    changes from one process to the next, and builders must give the same files every time.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate([*alphabet, *(char + "</w>" for char in alphabet)])}
    merges: list[tuple[str, str]] = []
    # CLIP lower-cases, then splits runs of letters from everything else; the corpus is ASCII, so bytes are chars.
    for word, _ in _word_counts([line.lower() for line in corpus], r"[a-z]+|[^\sa-z0-9]+"):
        symbols = [*word[:-1], word[-1] + "</w>"]
        built = symbols[0]
        for symbol in symbols[1:]:  # merge left to right: a, ab, abc ... the whole word
            if built + symbol not in vocab:
                merges.append((built, symbol))
                vocab[built + symbol] = len(vocab)
            built += symbol
    for special in _CLIP_SPECIALS:  # last, as in CLIP's own vocabulary
        vocab[special] = len(vocab)
    # transformers annotates `merges` as strings, but the BPE model underneath takes pairs.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _t5_tokenizer(corpus: list[str]) -> Any:
    """A T5 Unigram (SentencePiece style, `▁` starts a word): the corpus's words scored by frequency, and
    every printable character as a costly fallback, so any ASCII text encodes without <unk>."""
    from transformers import T5Tokenizer

    words = _word_counts(corpus, r"\w+")
    total = sum(count for _, count in words)
    vocab = [(special, 0.0) for special in _T5_SPECIALS]
    vocab += [("▁" + word, math.log(count / total)) for word, count in words]
    vocab += [("▁", -12.0)] + [(char, -14.0) for char in string.printable.strip()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _diffusers() -> Any:
    """diffusers, untyped: its annotations do not describe its pipelines (loader mixins, untyped constructors)."""
    return importlib.import_module("diffusers")


def build_tiny_flux(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random FluxPipeline (`save_pretrained` layout) to `dest`; return `dest`.

    The same seed gives the same weights and tokenizers. FLUX.1-schnell's layout, shrunk: a
    guidance-free transformer, a VAE that downsamples 8x like the real one (so the pipeline's
    size rules and latent packing are the real ones), and schnell's scheduler settings.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    diffusers = _diffusers()

    corpus = _corpus(2000, seed)
    clip_tokenizer = _clip_tokenizer(corpus)
    t5_tokenizer = _t5_tokenizer(corpus)
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=_CLIP_WIDTH,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=_CLIP_WIDTH,
                # The pooled output is read at the first EOS; ids other than 2 make CLIP look the token up.
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=_T5_WIDTH,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        )
        transformer = diffusers.FluxTransformer2DModel(**_TRANSFORMER)
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),  # four blocks: the real 8x downsampling
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=_VAE_SCALING,
            shift_factor=_VAE_SHIFT,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    pipeline = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest)
    return dest


def build_tiny_flux_lora_a(dest: Path) -> Path:
    """A LoRA adapter for `build_tiny_flux`'s pipeline, saved for `load_lora_weights(dest)`."""
    return _build_tiny_flux_lora(dest, seed=1)


def build_tiny_flux_lora_b(dest: Path) -> Path:
    """A second adapter for the same pipeline that changes its output differently from `a`."""
    return _build_tiny_flux_lora(dest, seed=2)


def _build_tiny_flux_lora(dest: Path, *, seed: int) -> Path:
    """LoRA on the transformer's attention projections, with random (not zero) up-weights so it changes the image."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    diffusers = _diffusers()

    config = LoraConfig(
        r=_LORA_RANK,
        lora_alpha=_LORA_RANK,  # what the loader assumes for a file without its adapter config
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,  # peft's default zeroes lora_B: the adapter would change nothing
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.FluxTransformer2DModel(**_TRANSFORMER)  # only its module names and shapes matter
        transformer.add_adapter(config)
    state = get_peft_model_state_dict(transformer)
    # The scale lives in the weights rather than in a saved adapter config (whose place in the file's
    # header changes from run to run): 16x, a change that shows in the picture, not just in the last bits.
    state = {key: tensor * _LORA_SCALE if ".lora_B." in key else tensor for key, tensor in state.items()}
    dest.mkdir(parents=True, exist_ok=True)
    diffusers.FluxPipeline.save_lora_weights(dest, transformer_lora_layers=state)
    return dest
