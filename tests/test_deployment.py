"""`Deployment` in process, on the real forecast backend: Feast lookups, the cache, and outcomes."""

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from sheaf.api import FeatureRef, ForecastRequest, TextGenerationRequest
from sheaf.config import Cache, DeploymentConfig, FeatureStore, ModelSource
from sheaf.deployment import Deployment
from sheaf.feature_demo import demo_series
from sheaf.features import FeatureStoreResolver
from sheaf.streaming import SSEDecoder
from tiny.timesfm import build_tiny_timesfm

BACKEND = "sheaf.backends.forecast:ForecastBackend"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_timesfm(tmp_path_factory.mktemp("timesfm"))


def loaded(config: DeploymentConfig) -> Deployment:
    deployment = Deployment(config, BACKEND)
    deployment.start()
    assert deployment.loaded.wait(60), deployment.load_error
    return deployment


def ref(entity: str) -> FeatureRef:
    return FeatureRef(feature_view="series_history", feature_name="values", entity_key="series_id", entity_value=entity)


def test_feature_ref_without_a_store_is_422_for_that_request_only(model: Path) -> None:
    deployment = loaded(DeploymentConfig(name="forecast", model=ModelSource(path=str(model))))
    outcomes = asyncio.run(
        deployment.predict([ForecastRequest(feature_ref=ref("sales")), ForecastRequest(history=[1.0, 2.0, 3.0])])
    )
    assert outcomes[0]["status"] == 422
    assert outcomes[0]["body"]["detail"][0]["loc"] == ["body", "feature_ref"]
    assert "no feature store" in outcomes[0]["body"]["detail"][0]["msg"]
    assert outcomes[1]["status"] == 200


def test_a_batch_looks_its_features_up_in_one_call(model: Path, feature_repo: Path) -> None:
    config = DeploymentConfig(
        name="forecast", model=ModelSource(path=str(model)), feature_store=FeatureStore(repo=str(feature_repo))
    )
    deployment = loaded(config)
    calls: list[int] = []
    resolver = deployment.lookups.features
    assert isinstance(resolver, FeatureStoreResolver)
    resolve = resolver.resolve

    def counted(refs: Any) -> Any:
        calls.append(len(refs))
        return resolve(refs)

    resolver.resolve = counted  # type: ignore[method-assign]
    requests = [ForecastRequest(feature_ref=ref(name)) for name in ("sales", "traffic", "temperature", "nope")]
    outcomes = asyncio.run(deployment.predict([*requests, ForecastRequest(history=[1.0, 2.0])]))
    assert calls == [4]
    assert [outcome["status"] for outcome in outcomes] == [200, 200, 200, 404, 200]
    direct = asyncio.run(deployment.predict([ForecastRequest(history=demo_series("traffic"))]))
    assert outcomes[1]["body"]["mean"] == direct[0]["body"]["mean"]


def test_loading_sizes_the_torch_thread_pool_of_the_threads_that_predict(model: Path) -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        loaded(DeploymentConfig(name="forecast", model=ModelSource(path=str(model)), threads=1))
        # A thread that first runs torch after loading, as the predict threads do (this thread has run torch before).
        predicting = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        predicting.start()
        predicting.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_the_cache_keeps_successes_and_streams_skip_it(model: Path) -> None:
    config = DeploymentConfig(name="forecast", model=ModelSource(path=str(model)), cache=Cache(enabled=True))
    deployment = loaded(config)
    first, bad = asyncio.run(
        deployment.predict([ForecastRequest(history=[1.0, 2.0, 3.0]), ForecastRequest(history=[1.0], horizon=5000)])
    )
    again, bad_again = asyncio.run(
        deployment.predict(
            [ForecastRequest(history=[1.0, 2.0, 3.0], request_id="mine"), ForecastRequest(history=[1.0], horizon=5000)]
        )
    )
    assert first["body"]["metadata"]["cache_hit"] is False
    assert again["body"]["metadata"]["cache_hit"] is True
    assert again["body"]["request_id"] == "mine"
    assert bad["status"] == bad_again["status"] == 422  # errors are never cached

    async def frames() -> list[str]:
        return [frame async for frame in deployment.stream(ForecastRequest(history=[1.0, 2.0, 3.0]))]

    (result,) = SSEDecoder().feed("".join(asyncio.run(frames())))
    assert "cache_hit" not in result["metadata"]


def test_streams_that_arrive_together_share_one_textgen_call_instead_of_queueing_behind_it(tiny_lm: Path) -> None:
    # Each stream leaves only once both have tokens: had the second queued behind the first's call
    # (30000 tokens long), neither would ever get there.
    config = DeploymentConfig(
        name="textgen", model=ModelSource(path=str(tiny_lm)), heartbeat_s=0.2, options={"max_new_tokens_limit": 30000}
    )
    deployment = Deployment(config, "sheaf.backends.textgen:TextGenerationBackend")
    deployment.start()
    assert deployment.loaded.wait(60), deployment.load_error

    async def both() -> list[int]:
        tokens = [0, 0]
        both_going = asyncio.Event()

        async def read(index: int) -> None:
            request = TextGenerationRequest(prompt=f"story {index}", max_new_tokens=30000, timeout_s=60)
            decoder = SSEDecoder()
            async for frame in deployment.stream(request):
                tokens[index] += sum(event["type"] == "token" for event in decoder.feed(frame))
                if min(tokens) >= 3:
                    both_going.set()
                if both_going.is_set():
                    return

        await asyncio.wait_for(asyncio.gather(read(0), read(1)), 30)
        return tokens

    assert min(asyncio.run(both())) >= 3
