"""The Kubernetes manifests of the production set: current, valid by the real schemas, and wired together."""

import copy
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from sheaf.config import SERVER_CONFIG_FILE, ConfigError, DeploymentConfig, load_config, load_server_config
from sheaf.job_routes import _store
from sheaf.job_store import RedisJobStore
from sheaf.kubernetes import DEFAULT_IMAGE, command_line, main, manifests, render

ROOT = Path(__file__).resolve().parent.parent
CONFIG_SET = "configs/production"
OUTPUT = "deploy/kubernetes/sheaf.yaml"
KUBERNETES_VERSION = "1.30"
ENTRY = "sheaf"
REDIS = "redis"

CONFIGS: list[DeploymentConfig] = [
    load_config(path) for path in sorted((ROOT / CONFIG_SET).glob("*.yaml")) if path.name != SERVER_CONFIG_FILE
]
DOCS = manifests(ROOT / CONFIG_SET, DEFAULT_IMAGE)


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in DOCS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def container(name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = find("Deployment", name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(name: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(name).get("env", [])}


def service_port(host: str) -> int:
    ports: list[dict[str, Any]] = find("Service", host)["spec"]["ports"]
    assert len(ports) == 1
    port: int = ports[0]["port"]
    return port


def bento_containers() -> list[dict[str, Any]]:
    return [container(name) for name in [config.name for config in CONFIGS] + [ENTRY]]


def test_committed_file_is_what_the_generator_makes_now() -> None:
    command = command_line(CONFIG_SET, DEFAULT_IMAGE, OUTPUT)
    committed = (ROOT / OUTPUT).read_text() if (ROOT / OUTPUT).exists() else ""
    assert committed == render(DOCS, command), f"{OUTPUT} is out of date: run `.venv/bin/{command}`"


def test_rendered_yaml_reads_back_as_the_same_documents_without_aliases() -> None:
    text = render(DOCS)
    assert list(yaml.safe_load_all(text)) == DOCS
    assert not re.search(r"[&*]id\d+", text), "an anchor or alias: a dict is shared between places"


@pytest.mark.parametrize("doc", list(yaml.safe_load_all((ROOT / OUTPUT).read_text())), ids=doc_id)
def test_every_committed_document_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def _port_as_words(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "three thousand"


def _misspelled_containers(doc: dict[str, Any]) -> None:
    # Beside the real field, so that only strict mode (no unknown fields) can catch it.
    pod = doc["spec"]["template"]["spec"]
    pod["contaners"] = copy.deepcopy(pod["containers"])


def _unknown_probe_field(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"


@pytest.mark.parametrize("breaks", [_port_as_words, _misspelled_containers, _unknown_probe_field])
def test_the_validator_rejects_a_broken_manifest(breaks: Any) -> None:
    broken = copy.deepcopy(find("Deployment", "textgen"))
    breaks(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_one_deployment_and_one_service_for_each_service_and_redis() -> None:
    names = {config.name for config in CONFIGS}
    assert names == {"flux", "forecast", "textgen", "whisper"}
    expected = sorted((kind, name) for kind in ("Deployment", "Service") for name in [*names, ENTRY, REDIS])
    assert sorted((doc["kind"], doc["metadata"]["name"]) for doc in DOCS) == expected
    assert not [doc for doc in DOCS if doc["kind"] == "Secret"], "the API key is the cluster's, never in the file"


def test_each_service_selects_its_deployments_pods_on_the_port_they_listen_on() -> None:
    for doc in DOCS:
        if doc["kind"] != "Service":
            continue
        name = doc["metadata"]["name"]
        deployment = find("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["type"] == "ClusterIP"
        assert doc["spec"]["selector"].items() <= labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert labels["app.kubernetes.io/name"] == name and labels["app.kubernetes.io/part-of"] == "sheaf"
        listening = {port["name"]: port["containerPort"] for port in container(name)["ports"]}
        for port in doc["spec"]["ports"]:
            assert port["targetPort"] in listening, f"{name}: targetPort {port['targetPort']} is no container port"
            assert port["port"] == listening[port["targetPort"]], name
        # Another pod's selector must not also match these pods.
        others = [d for d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] != name]
        for other in others:
            assert not doc["spec"]["selector"].items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_each_bento_container_serves_its_own_service_on_port_3000() -> None:
    for config_name in [config.name for config in CONFIGS] + [ENTRY]:
        args = container(config_name)["args"]
        assert container(config_name)["image"] == DEFAULT_IMAGE
        assert args[0] == "start-http-server", "the bento image's entrypoint takes start-* as its first argument"
        assert args[args.index("--service-name") + 1] == config_name
        assert args[args.index("--port") + 1] == "3000" and args[args.index("--host") + 1] == "0.0.0.0"
        assert "command" not in container(config_name), "a command would bypass the image's entrypoint"


def test_gpu_limits_exactly_where_the_config_asks_for_gpus() -> None:
    wanted = {config.name: config.resources.gpu or 0 for config in CONFIGS}
    assert any(wanted.values()), "the production set should ask for GPUs somewhere"
    for doc in DOCS:
        if doc["kind"] != "Deployment":
            continue
        name = doc["metadata"]["name"]
        resources = container(name).get("resources", {})
        assert resources.get("limits", {}).get("nvidia.com/gpu", 0) == wanted.get(name, 0), name
        assert "nvidia.com/gpu" not in resources.get("requests", {}), name
    for config in CONFIGS:
        resources = container(config.name)["resources"]
        if config.resources.memory:
            assert resources["requests"]["memory"] == resources["limits"]["memory"] == config.resources.memory
        if config.resources.cpu:
            assert resources["requests"]["cpu"] == config.resources.cpu


def test_the_entry_service_depends_on_every_deployment_through_its_service() -> None:
    args = container(ENTRY)["args"]
    depends = [args[i + 1] for i, arg in enumerate(args) if arg == "--depends"]
    mapped = dict(entry.split("=", 1) for entry in depends)
    assert len(mapped) == len(depends), "a deployment named twice"
    assert set(mapped) == {config.name for config in CONFIGS}
    for name, url in mapped.items():
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname == name, url
        assert parts.port == service_port(name), url
    for config in CONFIGS:
        assert "--depends" not in container(config.name)["args"]


def test_every_probe_asks_the_port_the_container_listens_on() -> None:
    for bento in bento_containers():
        port = bento["ports"][0]["containerPort"]
        assert bento["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert bento["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert bento["livenessProbe"]["httpGet"]["path"] == "/livez"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert bento[kind]["httpGet"]["port"] == port, f"{bento['name']} {kind}"
        startup = bento["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60, "model loading takes minutes"
    redis = container(REDIS)
    for kind in ("readinessProbe", "livenessProbe"):
        assert redis[kind]["tcpSocket"]["port"] == redis["ports"][0]["containerPort"] == service_port(REDIS)
    assert redis["image"] == "redis:7"


def test_every_bento_container_gets_the_config_set_and_the_key_from_a_secret() -> None:
    for bento in bento_containers():
        variables = env(bento["name"])
        assert variables["SHEAF_CONFIG_SET"] == {"name": "SHEAF_CONFIG_SET", "value": "production"}
        # Every pod imports the entry service's module, which refuses to start without the key.
        key = variables["SHEAF_API_KEY"]
        assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"] == "sheaf-api-key"
        assert not key["valueFrom"]["secretKeyRef"].get("optional"), "auth.required: a pod without it cannot start"


def test_every_variable_the_forecast_files_read_is_set_and_redis_addresses_are_the_service() -> None:
    forecast = next(config for config in CONFIGS if config.feature_store)
    assert forecast.feature_store is not None
    read = re.findall(r"\$\{(\w+)\}", (Path(forecast.feature_store.repo) / "feature_store.yaml").read_text())
    read += re.findall(r"\$\{(\w+)\}", forecast.cache.url or "")
    variables = env(forecast.name)
    assert read and set(read) <= set(variables), f"unset in the forecast pod: {set(read) - set(variables)}"
    addresses = [entry["value"] for entry in variables.values() if "redis" in entry.get("value", "")]
    assert addresses, "no Redis address given to the forecast pod"
    for address in addresses:
        parts = urlsplit(address if "://" in address else f"redis://{address}")
        assert (parts.hostname, parts.port) == (REDIS, service_port(REDIS)), address


def test_the_production_set_keeps_its_jobs_in_the_clusters_redis_which_the_entry_pod_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not SQLite in the entry pod, which has no volume: its jobs would go with every restart."""
    jobs = load_server_config(ROOT / CONFIG_SET).jobs
    assert jobs.store == "redis" and jobs.url is not None
    (variable,) = re.fullmatch(r"\$\{(\w+)\}", jobs.url).groups()  # type: ignore[union-attr]
    given = env(ENTRY)[variable]
    assert set(given) == {"name", "value"}, given  # the cluster's own address, not a setting to make
    parts = urlsplit(given["value"])
    assert (parts.scheme, parts.hostname, parts.port) == ("redis", REDIS, service_port(REDIS))
    # A database of its own: not Feast's (0, the default) nor the predict cache's.
    cache_urls = [entry["value"] for entry in env("forecast").values() if entry.get("value", "").startswith("redis://")]
    used = {urlsplit(url).path or "/0" for url in cache_urls} | {"/0"}
    assert parts.path not in used, (parts.path, used)
    # What the entry service makes of it in that pod: a Redis store at that address.
    monkeypatch.setenv(variable, given["value"])
    store = _store(jobs)
    assert isinstance(store, RedisJobStore) and store.url == given["value"]


def test_redis_evicts_only_what_expires_before_the_pod_hits_its_memory_limit() -> None:
    redis = container(REDIS)
    args = dict(zip(redis["args"][::2], redis["args"][1::2], strict=True))
    assert args["--maxmemory-policy"] == "volatile-lru"  # never Feast's features or an unfinished job
    units = {"mb": 1 << 20, "gb": 1 << 30, "Mi": 1 << 20, "Gi": 1 << 30}

    def size(text: str) -> int:
        number, unit = re.fullmatch(r"(\d+)([a-zA-Z]+)", text).groups()  # type: ignore[union-attr]
        return int(number) * units[unit]

    limit = redis["resources"]["limits"]["memory"]
    assert size(args["--maxmemory"]) <= 0.85 * size(limit), (args, limit)


def test_the_cli_writes_the_file_with_its_command_in_the_header(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    output = tmp_path / "sheaf.yaml"
    main([CONFIG_SET, "--image", "registry.example/sheaf-bento-gpu:1.2", "-o", str(output)])
    text = output.read_text()
    assert text.splitlines()[1].endswith(f"{CONFIG_SET} --image registry.example/sheaf-bento-gpu:1.2 -o {output}")
    assert text.count("image: registry.example/sheaf-bento-gpu:1.2\n") == len(CONFIGS) + 1


def test_a_config_folder_the_image_does_not_carry_is_refused(tmp_path: Path) -> None:
    shutil.copytree(ROOT / CONFIG_SET, tmp_path / "production")
    with pytest.raises(ConfigError, match="not a config set"):
        manifests(tmp_path / "production", DEFAULT_IMAGE)
