"""Deployment configuration: one YAML file per deployment under the config directory."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR_ENV = "SHEAF_CONFIG_DIR"
CONFIG_SET_ENV = "SHEAF_CONFIG_SET"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


_UNSET_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
"""A variable `os.path.expandvars` leaves in place: the environment does not set it."""


def env_expanded(key: str, value: str) -> str:
    """`value` (a setting such as a Redis URL) with its `$VAR` / `${VAR}` from the environment;
    ValueError naming `key` when the environment does not set one."""
    expanded = os.path.expandvars(value)
    if unset := _UNSET_VARIABLE.findall(expanded):
        raise ValueError(f"{key} {value!r}: the environment does not set {', '.join(unset)}")
    return expanded


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
    """Adaptive batching, in each replica of the deployment (`sheaf.batching`): a batch leaves as
    soon as the model is free, with every predict that came while it was busy, up to
    `max_batch_size`. There is no window to tune: at low load a predict waits for nothing."""

    max_batch_size: int = Field(8, ge=1, description="1 turns batching off.")
    max_queue_ms: int = Field(
        60_000, ge=1, description="The longest a predict waits queued for a free worker; then 503 with Retry-After."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        # BentoML's `max_latency_ms` is a batch window; ours never was one, so it has another name now.
        if isinstance(raw, dict) and "max_latency_ms" in raw:
            raise ValueError(
                "`max_latency_ms` is now `max_queue_ms` (the longest a predict waits queued for a free worker)"
            )
        return raw


class Limits(_Strict):
    """When the deployment is full: past a limit a request gets 503 with `Retry-After`, at once.
    Counted by each entry-service replica (`sheaf.gateway.Gate`)."""

    max_pending: int = Field(256, ge=1, description="Predict requests queued or running (batch items count).")
    max_streams: int = Field(32, ge=1, description="Streams open at once.")
    retry_after_s: int = Field(1, ge=0, description="The `Retry-After` of a 503.")
    max_queued_jobs: int = Field(64, ge=1, description="Jobs waiting to run (`POST /{name}/jobs`); then 503.")


class Cache(_Strict):
    """The predict cache (streams never use it): in each replica's memory, or in Redis, which
    every replica of the deployment shares."""

    enabled: bool = Field(False, description="`backend: redis` turns it on unless this says false.")
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = Field(
        None, description="Redis URL for `backend: redis`, e.g. redis://redis:6379/1; ${VAR} reads the environment."
    )
    timeout_ms: int = Field(250, ge=1, description="Redis: the longest a lookup or store may take; past it, a miss.")
    max_entries: int = Field(1024, ge=1, description="memory: entries kept (Redis evicts by its own maxmemory).")
    ttl_s: float = Field(60.0, gt=0)
    max_mb: float = Field(64.0, gt=0, description="memory: budget for all entries; the oldest go first past it.")
    max_entry_mb: float = Field(1.0, gt=0, description="Answers larger than this are not kept.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Cache:
        if self.backend == "redis":
            if not self.url:
                raise ValueError("`backend: redis` needs `url`, e.g. redis://redis:6379/1")
            if "enabled" not in self.model_fields_set:
                self.enabled = True
        return self


class FeatureStore(_Strict):
    """The Feast repo that resolves a request's `feature_ref` into its `history`."""

    repo: str = Field(description="Folder holding feature_store.yaml; relative to this config file.")


class Resources(_Strict):
    """What BentoML reserves for each worker of the deployment (and asks of a cluster)."""

    cpu: str | None = Field(None, pattern=r"^(\d+(\.\d+)?|\d+m)$", description='Cores, e.g. "2" or "500m".')
    memory: str | None = Field(None, description='e.g. "8Gi".')
    gpu: int | None = Field(None, ge=0, description="GPUs per worker.")
    gpu_type: str | None = Field(None, description='e.g. "nvidia-l4".')


class DeploymentConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Route prefix: /{name}/predict; the file name.")
    backend: str | None = Field(None, description="`module:Class` to use instead of the deployment's own backend.")
    model: ModelSource
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    workers: int = Field(1, ge=1, description="Worker processes, each with its own copy of the model.")
    resources: Resources = Resources()
    threads: int | None = Field(
        None,
        ge=1,
        description="Threads for the model's CPU work per worker (torch; CTranslate2 for whisper). "
        "Default: resources.cpu rounded up, else the library's own (every core).",
    )
    batching: Batching = Batching()
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a request may take, end to end (504); a request's own `timeout_s` is capped by it.",
    )
    heartbeat_s: float = Field(15.0, gt=0, description="A started stream quiet this long gets an SSE comment line.")
    limits: Limits = Limits()
    max_body_mb: float = Field(32.0, gt=0, description="Larger request bodies get 413 before anything runs.")
    cache: Cache = Cache()
    feature_store: FeatureStore | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")

    def model_threads(self) -> int | None:
        """Threads for the model's CPU work, or None for the library's default.

        More threads than the cores a worker really gets do not go faster on CPU: the idle ones
        spin between operations, taking the cores that the HTTP side needs."""
        if self.threads or not self.resources.cpu:
            return self.threads
        cpu = self.resources.cpu
        return max(1, math.ceil(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))

    def timeout_for(self, *requested: float | None) -> float:
        """A request's deadline in seconds: its own `timeout_s`, capped by this deployment's.
        Given a batch's, the longest of them: the batch runs until its last caller gives up."""
        return max(min(own or self.timeout_s, self.timeout_s) for own in requested)


SERVER_CONFIG_FILE = "sheaf.yaml"
"""The entry service's own settings, beside the deployment configs; optional."""


class Auth(_Strict):
    """An API key on every route (`Authorization: Bearer KEY`), read from the environment."""

    api_key_env: str = Field("SHEAF_API_KEY", description="The variable that holds the key; unset: no key asked.")
    required: bool = Field(False, description="Refuse to start when that variable is unset.")
    open_probes: bool = Field(True, description="Health and readiness probes answer without the key.")
    open_metrics: bool = Field(True, description="`/metrics` answers without the key.")


class ClientTimeouts(_Strict):
    """How long the entry service waits for a request to arrive; past it, 408 and the connection closes."""

    headers_s: float = Field(
        10.0, gt=0, description="From the connection's start, or a request's first byte, to the end of its headers."
    )
    body_s: float = Field(
        30.0, gt=0, description="From the end of the headers to the end of the body (32 MB in 30 s needs 1.1 MB/s)."
    )


class Jobs(_Strict):
    """Where jobs (`/{name}/jobs`) and their event logs are kept, and for how long."""

    store: Literal["sqlite", "redis"] = "sqlite"
    path: str | None = Field(None, description="sqlite: the file; default jobs.sqlite3 in the cache folder.")
    url: str | None = Field(None, description="redis: e.g. redis://redis:6379/2; ${VAR} reads the environment.")
    ttl_s: float = Field(86_400, gt=0, description="How long a finished job is kept.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Jobs:
        if self.store == "redis" and not self.url:
            raise ValueError("`store: redis` needs `url`, e.g. redis://redis:6379/2")
        return self


class ServerConfig(_Strict):
    """`sheaf.yaml`: what the entry service does for every deployment."""

    jobs: Jobs = Jobs()

    auth: Auth = Auth()
    client_timeouts: ClientTimeouts = ClientTimeouts()
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="After SIGTERM, how long requests in flight may run before they are cut off."
    )


def load_server_config(folder: Path) -> ServerConfig:
    """`folder/sheaf.yaml`, or the defaults when there is none."""
    path = folder / SERVER_CONFIG_FILE
    if not path.exists():
        return ServerConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return ServerConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, first['loc'])) or '(top level)'}: {first['msg']}") from None


def config_dir() -> Path:
    """The active config set: `SHEAF_CONFIG_DIR` (any folder), else `configs/<SHEAF_CONFIG_SET>`
    (a set shipped with the code, e.g. `production`), else `configs/`."""
    if chosen := os.environ.get(CONFIG_DIR_ENV):
        folder, variable = Path(chosen).expanduser().resolve(), CONFIG_DIR_ENV
    elif chosen := os.environ.get(CONFIG_SET_ENV):
        folder, variable = DEFAULT_CONFIG_DIR / chosen, CONFIG_SET_ENV
    else:
        return DEFAULT_CONFIG_DIR
    if not folder.is_dir():
        sets = sorted(p.name for p in DEFAULT_CONFIG_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
        raise ConfigError(f"{variable}={chosen}: no such config folder {folder} (shipped sets: {', '.join(sets)})")
    return folder


def load_config(path: Path, options: type[BaseModel] | None = None) -> DeploymentConfig:
    """Read and validate one config file, its `options:` too when given their model; relative
    paths resolve against the file."""
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
        if options is not None and config.backend is None:  # a custom backend validates its own, at load
            options.model_validate(config.options)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from None
    if config.model.path:
        config.model.path = str((path.parent / Path(config.model.path).expanduser()).resolve())
    if config.feature_store:
        config.feature_store.repo = str((path.parent / Path(config.feature_store.repo).expanduser()).resolve())
    return config


def _describe(path: Path, exc: ValidationError) -> str:
    """`file: key: problem (got value)` for the first error; `options` keys are prefixed as in the file."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if exc.title != DeploymentConfig.__name__:
        loc.insert(0, "options")
    got = first.get("input")
    shown = "" if first["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {'.'.join(loc) or '(top level)'}: {first['msg']}{shown}"


def check_config_dir(served: list[str]) -> None:
    """Stop start-up (`SystemExit`) unless the active config set configures some deployment and
    every file in it is read: an unread file is most likely a typo in its name."""
    folder = config_dir()
    read = {f"{name}.yaml" for name in served} | {SERVER_CONFIG_FILE}
    unused = sorted(path.name for path in folder.glob("*.yaml") if path.name not in read)
    if unused:
        raise SystemExit(f"sheaf: config error: {folder}: no service module reads {', '.join(unused)}")
    if not served:
        raise SystemExit(f"sheaf: config error: {folder}: no deployment configs (*.yaml) there")
