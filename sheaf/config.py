"""Deployment configuration: one YAML file per deployment under the config directory."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR_ENV = "SHEAF_CONFIG_DIR"
CACHE_DIR_ENV = "SHEAF_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/sheaf"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    """A deployment config is missing or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSource(_Strict):
    """Where the weights come from: exactly one of a local path, a Python package that ships
    them, a hub id, or a builder that makes them (once, into the cache)."""

    path: str | None = None
    package: str | None = Field(None, description="Import name of a package that carries the weights.")
    file: str | None = Field(None, description="Glob for the weights file inside `package`.")
    hub: str | None = Field(None, description="Hub id, for machines that can reach a model hub.")
    build: str | None = Field(None, description="`module:function(dest: Path) -> Path` that writes the weights.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("path", "package", "hub", "build") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of `path`, `package`, `hub` and `build`")
        return self


class Batching(_Strict):
    """BentoML adaptive batching. It decides by itself how long to wait to fill a batch;
    `max_latency_ms` is a budget, not a window: a request whose queue wait plus the expected
    batch time passes it is refused with 503, so keep it above the slowest full batch."""

    max_batch_size: int = Field(8, ge=1)
    max_latency_ms: int = Field(60_000, ge=1)


class Cache(_Strict):
    """The predict cache (streams never use it)."""

    enabled: bool = False
    max_entries: int = Field(1024, ge=1)
    ttl_s: float = Field(60.0, gt=0)


class FeatureStore(_Strict):
    """The Feast repo that resolves a request's `feature_ref` into its `history`."""

    repo: str = Field(description="Folder holding feature_store.yaml; relative to this config file.")


class DeploymentConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Route prefix: /{name}/predict.")
    backend: str | None = Field(None, description="`module:Class` to use instead of the deployment's own backend.")
    model: ModelSource
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batching: Batching = Batching()
    timeout_s: float = Field(300.0, gt=0, description="Longest a request may take, end to end.")
    max_body_mb: float = Field(32.0, gt=0, description="Larger request bodies get 413 before anything runs.")
    cache: Cache = Cache()
    feature_store: FeatureStore | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def load_config(path: Path) -> DeploymentConfig:
    """Read and validate one config file; relative model paths resolve against the file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        config = DeploymentConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {key}: {first['msg']}") from None
    if config.model.path:
        config.model.path = str((path.parent / Path(config.model.path).expanduser()).resolve())
    if config.feature_store:
        config.feature_store.repo = str((path.parent / Path(config.feature_store.repo).expanduser()).resolve())
    return config


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
