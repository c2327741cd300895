"""The README's examples, run against `make serve`'s own configs (real SmolLM2 weights)."""

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sheaf.streaming import SSEDecoder
from tests.conftest import ROOT, Server, serve

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("default-serve")
    yield from serve(ROOT / "configs", home / "server.log", env={"SHEAF_CACHE_DIR": str(smollm2_cache)})


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_two_set_up_commands() -> None:
    first = blocks("bash")[0]
    assert first.splitlines()[0].startswith("make serve")
    assert first.splitlines()[1].startswith("make test")


def test_the_curl_example_streams_tokens_then_real_text(default_server: Server) -> None:
    curl = next(block for block in blocks("bash") if "curl -N" in block)
    words = shlex.split(curl.replace("\\\n", " "))
    route = next(word for word in words if word.startswith("127.0.0.1:3000/"))
    body = json.loads(words[words.index("-d") + 1])
    url = default_server.url + route.removeprefix("127.0.0.1:3000")

    reads: list[list[dict[str, Any]]] = []
    decoder = SSEDecoder()
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            reads.append(decoder.feed(chunk))
    events = [event for read in reads for event in read]
    *tokens, result = events
    assert len(tokens) > 5 and {event["type"] for event in tokens} == {"token"}
    assert result["type"] == "result"
    assert result["text"] == "".join(event["text"] for event in tokens)
    assert "Paris" in result["text"]
    # Tokens went out as they were produced, in many network reads, long before the result.
    assert len([read for read in reads if read]) > len(tokens) // 2


def test_the_python_examples_run(default_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    for code in blocks("python"):
        exec(compile(code.replace("http://127.0.0.1:3000", default_server.url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Paris" in printed
    assert "tokens" in printed
