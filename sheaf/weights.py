"""The weights store: where a deployment's `model` source is found, and the cache that built or converted
weights are written to once (`SHEAF_CACHE_DIR`, default `~/.cache/sheaf`)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sheaf.config import ModelSource

CACHE_DIR_ENV = "SHEAF_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/sheaf"


def cache_dir() -> Path:
    """Where converted or built weights are kept between starts (`SHEAF_CACHE_DIR`)."""
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser()


def weights_location(source: ModelSource) -> str | None:
    """The folder or hub id that `source` names, building a `build` source first; None for a
    `package` source, whose layout only its backend knows (see `find_in_package`)."""
    if source.path:
        return source.path
    if source.hub:
        return source.hub
    if source.build:
        return str(built_weights(source.build))
    return None


def find_in_package(package: str, pattern: str) -> Path:
    """The one file or folder matching `pattern` inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)  # imports nothing for a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (or is not a package)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"nothing matches {pattern!r} in package {package} ({folder})")
    if len(matches) > 1:
        names = ", ".join(match.name for match in matches)
        raise ValueError(
            f"{pattern!r} matches several entries in package {package} ({names}); name one in `model.file`"
        )
    return matches[0]


def built_weights(builder: str) -> Path:
    """The folder a `build` source writes, made once per builder into the cache."""
    module, _, name = builder.partition(":")
    return write_once(
        cache_dir() / "built" / builder.replace(":", "--"),
        lambda staging: getattr(importlib.import_module(module), name)(staging),
    )


def write_once(dest: Path, write: Callable[[Path], object]) -> Path:
    """Have `write` fill the folder `dest` unless it exists; it appears whole or not at all."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(staging)
        try:
            staging.rename(dest)
        except OSError:
            if not dest.is_dir():  # else another process wrote it first: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
