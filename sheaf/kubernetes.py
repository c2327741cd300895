"""Kubernetes manifests for a config set: each deployment and the entry service in a pod of its own.

Every pod runs the same bento image (the GPU bento for the production set) and serves one
BentoML service of it; the entry service reaches the others through their Services
(`--depends NAME=http://NAME:3000`). A Redis pod holds the Feast online store, the
shared predict cache and the jobs (`jobs: {store: redis}` in sheaf.yaml), each in a database
of its own.

    python -m sheaf.kubernetes configs/production --image REGISTRY/sheaf-bento-gpu:TAG -o deploy/kubernetes/sheaf.yaml

What the manifests refer to but do not hold, to create once per namespace:

    kubectl create secret generic sheaf-api-key --from-literal=api-key="$(openssl rand -hex 32)"
    kubectl create secret generic sheaf-hf-token --from-literal=token=hf_...   # optional: gated models
    kubectl create configmap sheaf-settings \\
      --from-literal=SHEAF_FEAST_REGISTRY=s3://bucket/feast/registry.db        # each ${VAR} it names
    kubectl apply -f deploy/kubernetes/sheaf.yaml

Weights are read from the model hub at each start; mount a volume at `HF_HOME` to keep them.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from sheaf.config import (
    CONFIG_SET_ENV,
    DEFAULT_CONFIG_DIR,
    SERVER_CONFIG_FILE,
    ConfigError,
    DeploymentConfig,
    ServerConfig,
    load_config,
    load_server_config,
)

DEFAULT_IMAGE = "sheaf-bento-gpu:latest"
"""What `bentoml containerize sheaf-bento-gpu:latest` tags; a placeholder for the registry's image."""
ENTRY_SERVICE = "sheaf"
PART_OF = "sheaf"
PORT = 3000
REDIS_SERVICE = "redis"
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7"
FEAST_REDIS_ADDRESS = f"{REDIS_SERVICE}:{REDIS_PORT}"
"""Feast's `connection_string` form: host:port[,option=value...]."""
CACHE_REDIS_URL = f"redis://{REDIS_SERVICE}:{REDIS_PORT}/1"
"""The predict cache in database 1, apart from Feast's keys in database 0."""
JOBS_REDIS_URL = f"redis://{REDIS_SERVICE}:{REDIS_PORT}/2"
"""The jobs and their event logs in database 2."""
REDIS_MEMORY = "1Gi"
REDIS_MAXMEMORY = "800mb"
"""Below the pod's limit, so that Redis evicts instead of being killed (and losing every key):
it evicts only keys with a time to live (`volatile-lru`), i.e. cached answers and finished
jobs, never Feast's features or a job still queued or running."""
API_KEY_SECRET = "sheaf-api-key"
API_KEY_SECRET_KEY = "api-key"
HF_TOKEN_SECRET = "sheaf-hf-token"
HF_TOKEN_SECRET_KEY = "token"
SETTINGS_CONFIGMAP = "sheaf-settings"
"""Values only the site knows (e.g. the Feast registry): one key per `${VAR}` a config reads."""
STARTUP_BUDGET_S = 30 * 60
"""Downloading and loading the largest model (FLUX, ~35 GB) before liveness checks begin."""
PROBE_PERIOD_S = 10

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def manifests(config_dir: Path, image: str) -> list[dict[str, Any]]:
    """A Deployment and a Service for each deployment config in `config_dir`, then for the entry
    service, then for Redis."""
    server = load_server_config(config_dir)
    configs = [load_config(path) for path in sorted(config_dir.glob("*.yaml")) if path.name != SERVER_CONFIG_FILE]
    if not configs:
        raise ConfigError(f"{config_dir}: no deployment configs (*.yaml) there")
    if not server.auth.open_probes:
        raise ConfigError(f"{config_dir / SERVER_CONFIG_FILE}: the kubelet's probes carry no key: set open_probes")
    # Every pod imports the whole bento, whose entry service module checks the key at import.
    common_env = [
        *_config_set_env(config_dir),
        _secret_env(server.auth.api_key_env, API_KEY_SECRET, API_KEY_SECRET_KEY, optional=not server.auth.required),
    ]
    docs: list[dict[str, Any]] = []
    for config in configs:
        container = _bento_container(config.name, image, ["--service-name", config.name])
        container["env"] = common_env + _deployment_env(config)
        container["resources"] = _resources(config)
        docs += [
            _deployment(config.name, "deployment", container, gpu=bool(config.resources.gpu)),
            _service(config.name),
        ]
    depends = [arg for config in configs for arg in ("--depends", f"{config.name}=http://{config.name}:{PORT}")]
    entry = _bento_container(ENTRY_SERVICE, image, ["--service-name", ENTRY_SERVICE, *depends])
    entry["env"] = common_env + _server_env(server)
    entry["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}  # routes and relays; the models are elsewhere
    docs += [_deployment(ENTRY_SERVICE, "entry", entry, grace_s=_entry_grace_s(server)), _service(ENTRY_SERVICE)]
    docs += [_deployment(REDIS_SERVICE, "store", _redis_container()), _service(REDIS_SERVICE, REDIS_PORT)]
    return docs


def render(docs: list[dict[str, Any]], command: str = "python -m sheaf.kubernetes CONFIG_SET --image IMAGE") -> str:
    """One multi-document YAML, headed by how it was made."""
    header = f"# Generated by sheaf.kubernetes; do not edit: change the configs and run\n#   {command}\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True, width=120)


def _config_set_env(config_dir: Path) -> list[dict[str, Any]]:
    """The image carries only the sets shipped under configs/: name the one to serve."""
    folder = config_dir.resolve()
    if folder == DEFAULT_CONFIG_DIR:
        return []
    if folder.parent != DEFAULT_CONFIG_DIR:
        raise ConfigError(f"{config_dir}: not a config set under {DEFAULT_CONFIG_DIR}, so not in the bento image")
    return [{"name": CONFIG_SET_ENV, "value": folder.name}]


def _deployment_env(config: DeploymentConfig) -> list[dict[str, Any]]:
    """The variables this deployment's files read: Redis addresses are the cluster's own; any
    other `${VAR}` comes from the settings ConfigMap."""
    env: list[dict[str, Any]] = []
    if config.model.hub:
        env.append(_secret_env("HF_TOKEN", HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY, optional=True))
    known: dict[str, str] = {}
    read: list[str] = []
    if config.feature_store:
        store = yaml.safe_load((Path(config.feature_store.repo) / "feature_store.yaml").read_text()) or {}
        connection = str((store.get("online_store") or {}).get("connection_string", ""))
        if whole := _VARIABLE.fullmatch(connection):
            known[whole.group(1)] = FEAST_REDIS_ADDRESS
        read += _VARIABLE.findall(yaml.safe_dump(store))
    if config.cache.backend == "redis" and config.cache.url:
        if whole := _VARIABLE.fullmatch(config.cache.url):
            known[whole.group(1)] = CACHE_REDIS_URL
        read += _VARIABLE.findall(config.cache.url)
    env += [_variable(name, known) for name in dict.fromkeys(read)]
    return env


def _server_env(server: ServerConfig) -> list[dict[str, Any]]:
    """The variables the entry service's `sheaf.yaml` reads: the jobs store's Redis is the cluster's."""
    if server.jobs.store != "redis" or not server.jobs.url:
        return []
    known: dict[str, str] = {}
    if whole := _VARIABLE.fullmatch(server.jobs.url):
        known[whole.group(1)] = JOBS_REDIS_URL
    return [_variable(name, known) for name in dict.fromkeys(_VARIABLE.findall(server.jobs.url))]


def _variable(name: str, known: dict[str, str]) -> dict[str, Any]:
    """A `${VAR}` a config reads: its value when the cluster knows it, else the settings ConfigMap's."""
    if name in known:
        return {"name": name, "value": known[name]}
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": SETTINGS_CONFIGMAP, "key": name}}}


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _resources(config: DeploymentConfig) -> dict[str, Any]:
    """BentoML's `resources` are the service's, shared by its workers (it gives every worker the
    same GPUs): so, the pod's."""
    wanted = config.resources
    requests = {key: value for key, value in (("cpu", wanted.cpu), ("memory", wanted.memory)) if value}
    limits: dict[str, str | int] = dict(requests)
    if wanted.gpu:
        limits["nvidia.com/gpu"] = wanted.gpu
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _entry_grace_s(server: ServerConfig) -> int:
    # Past the entry service's own drain, so that the kubelet's SIGKILL never cuts it short.
    return math.ceil(server.shutdown_grace_s) + 10


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
    }


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": PART_OF}


def _bento_container(name: str, image: str, serve_args: list[str]) -> dict[str, Any]:
    """BentoML's image entrypoint runs `start-http-server ARGS` as `python -m bentoml_cli._internal.start
    start-http-server ARGS $BENTO_PATH`: `args`, not `command`, so that the entrypoint runs."""

    def probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
        get = {"path": path, "port": PORT}
        return {"httpGet": get, "periodSeconds": period_s, "timeoutSeconds": 5, "failureThreshold": failures}

    return {
        "name": name,
        "image": image,
        "args": ["start-http-server", *serve_args, "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "startupProbe": probe("/readyz", PROBE_PERIOD_S, STARTUP_BUDGET_S // PROBE_PERIOD_S),
        "readinessProbe": probe("/readyz", PROBE_PERIOD_S, 3),
        "livenessProbe": probe("/livez", 20, 3),
    }


def _redis_container() -> dict[str, Any]:
    return {
        "name": REDIS_SERVICE,
        "image": REDIS_IMAGE,
        "args": ["--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "volatile-lru"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "500m", "memory": REDIS_MEMORY}, "limits": {"memory": REDIS_MEMORY}},
        # Two dicts, not one: PyYAML writes an object met twice as an anchor and an alias.
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": PROBE_PERIOD_S},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": PROBE_PERIOD_S},
    }


def _deployment(
    name: str, component: str, container: dict[str, Any], gpu: bool = False, grace_s: int | None = None
) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [container]}
    if gpu:
        # GPU nodes are commonly tainted so that only pods asking for a GPU land there.
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if grace_s is not None:
        pod["terminationGracePeriodSeconds"] = grace_s
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": _labels(name, component)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _selector(name)},
            "template": {"metadata": {"labels": _labels(name, component)}, "spec": pod},
        },
    }


def _service(name: str, port: int = PORT) -> dict[str, Any]:
    port_name = "redis" if name == REDIS_SERVICE else "http"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": _selector(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(name),
            "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}],
        },
    }


def command_line(config_dir: str, image: str, output: str | None) -> str:
    """The command that makes the file, for its header."""
    words = ["python", "-m", "sheaf.kubernetes", config_dir, "--image", image]
    return shlex.join(words + (["-o", output] if output else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sheaf.kubernetes", description="Kubernetes manifests for a config set, as one YAML file."
    )
    parser.add_argument("config_dir", help="a config set, e.g. configs/production")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"the bento image (default: {DEFAULT_IMAGE})")
    parser.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    try:
        docs = manifests(Path(args.config_dir), args.image)
    except ConfigError as exc:
        raise SystemExit(f"sheaf.kubernetes: {exc}") from None
    text = render(docs, command_line(args.config_dir, args.image, args.output))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
