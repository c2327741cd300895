"""A packaged GGUF checkpoint (SmolLM2's, for one) as a transformers folder: `converted_gguf`.

transformers reads GGUF but cannot save what it read, and dequantising takes a while, so the file is
rebuilt once into a plain folder in the weights cache and read from there on every later start.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sheaf.backends.base import elapsed_ms
from sheaf.weights import cache_dir, write_once

logger = logging.getLogger("sheaf.backends.gguf")


def converted_gguf(package: str, gguf: Path) -> Path:
    """The transformers folder for `gguf`, a file of `package`: converted into the cache on first use."""
    cached = cache_dir() / "models" / _cache_name(package, gguf)
    return write_once(cached, lambda staging: _convert_gguf(gguf, staging))


def _cache_name(package: str, gguf: Path) -> str:
    """Names the exact file: a reinstalled or upgraded package gets a fresh conversion."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{package}--{gguf.stem}--{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint into a transformers folder at `dest` (a staging folder of `write_once`)."""
    started = time.perf_counter()
    logger.info("converting %s (once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF cannot be saved as it is; a fresh one of the same config takes its weights and can.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    logger.info("converted %s in %.1f s", gguf.name, elapsed_ms(started) / 1000)
