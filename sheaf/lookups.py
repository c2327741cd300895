"""What a deployment looks up around its model call: the history a request's `feature_ref`
names (the feature store, for the whole batch in one call) and answers in the predict cache.
Streams take the first only; they never use the cache."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sheaf import metrics
from sheaf.api.base import BaseRequest
from sheaf.cache import cache_from_config, cache_key
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.outcomes import Outcome, failure, success

if TYPE_CHECKING:
    from sheaf.features import FeatureStoreResolver


class Lookups:
    def __init__(self, config: DeploymentConfig) -> None:
        self.name = config.name
        self.feature_repo = config.feature_store.repo if config.feature_store else None
        self.features: FeatureStoreResolver | None = None  # set by `load`
        self.cache = cache_from_config(config.cache, config.name)

    def load(self) -> None:
        if self.feature_repo is not None:
            from sheaf.features import FeatureStoreResolver  # imports feast: seconds

            self.features = FeatureStoreResolver(self.feature_repo)

    async def before_model(
        self, batch: list[BaseRequest[Any]]
    ) -> tuple[list[Outcome | None], list[dict[str, Any]], dict[int, str]]:
        """Each predict's outcome where it has one before the model runs (a refused `feature_ref`, a
        cache hit), its metadata, and the cache keys to store the others' answers under. A resolved
        `feature_ref` replaces its request in `batch`."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        metadata: list[dict[str, Any]] = [{} for _ in batch]
        await self.resolve_features(batch, outcomes, metadata)
        return outcomes, metadata, await self._answer_from_cache(batch, outcomes, metadata)

    async def remember(self, key: str | None, outcome: Outcome) -> None:
        if self.cache is not None and key is not None and outcome["status"] == 200:
            await self.cache.store(key, outcome["body"])

    async def resolve_features(
        self, batch: list[BaseRequest[Any]], outcomes: list[Outcome | None], metadata: list[dict[str, Any]]
    ) -> None:
        """Replace each `feature_ref` with the history it names, in one store call for the batch."""
        wanted = [request.features_wanted() for request in batch]
        wanting = [i for i, ref in enumerate(wanted) if ref is not None]
        if not wanting:
            return
        if self.features is None:
            refused = InvalidRequest("feature_ref", "this deployment has no feature store configured")
            for i in wanting:
                outcomes[i] = failure(refused)
            return
        refs = [ref for ref in wanted if ref is not None]
        with metrics.FEATURE_LOOKUP.labels(self.name).time():
            resolved = await asyncio.to_thread(self.features.resolve, refs)
        for i, result in zip(wanting, resolved, strict=True):
            if isinstance(result, Exception):
                outcomes[i] = failure(result)
            else:
                batch[i] = batch[i].with_features(result.values)
                metadata[i].update(result.metadata())

    async def _answer_from_cache(
        self, batch: list[BaseRequest[Any]], outcomes: list[Outcome | None], metadata: list[dict[str, Any]]
    ) -> dict[int, str]:
        """Fill cache hits in (one lookup for the batch); the keys of the rest, to store their answers under."""
        if self.cache is None:
            return {}
        keys = {i: cache_key(request.model_dump(mode="json")) for i, request in enumerate(batch) if outcomes[i] is None}
        hits = await self.cache.get_many(list(keys.values()))
        for i, hit in zip(list(keys), hits, strict=True):
            metadata[i]["cache_hit"] = hit is not None
            if hit is not None:
                outcomes[i] = success({**hit, "request_id": batch[i].request_id})
                del keys[i]
        return keys


def with_metadata(outcome: Outcome, extra: dict[str, Any]) -> Outcome:
    """A successful outcome with `extra` (what its lookups found) in its `metadata`."""
    if not extra or outcome["status"] != 200:
        return outcome
    body = outcome["body"]
    return {**outcome, "body": {**body, "metadata": {**body.get("metadata", {}), **extra}}}
