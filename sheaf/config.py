"""Deployment configuration: one YAML file per deployment under the config directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR_ENV = "SHEAF_CONFIG_DIR"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    """A deployment config is missing or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSource(_Strict):
    """Where the weights come from: exactly one of a local path, a Python package that ships them, or a hub id."""

    path: str | None = None
    package: str | None = Field(None, description="Import name of a package that carries the weights.")
    file: str | None = Field(None, description="Glob for the weights file inside `package`.")
    hub: str | None = Field(None, description="Hub id, for machines that can reach a model hub.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("path", "package", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of `path`, `package` and `hub`")
        return self


class Batching(_Strict):
    """BentoML adaptive batching. It decides by itself how long to wait to fill a batch;
    `max_latency_ms` is a budget, not a window: a request whose queue wait plus the expected
    batch time passes it is refused with 503, so keep it above the slowest full batch."""

    max_batch_size: int = Field(8, ge=1)
    max_latency_ms: int = Field(60_000, ge=1)


class DeploymentConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Route prefix: /{name}/predict.")
    backend: str | None = Field(None, description="`module:Class` to use instead of the deployment's own backend.")
    model: ModelSource
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batching: Batching = Batching()
    timeout_s: float = Field(300.0, gt=0, description="Longest a request may take, end to end.")
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
    if config.model.path and not Path(config.model.path).is_absolute():
        config.model.path = str((path.parent / config.model.path).resolve())
    return config
