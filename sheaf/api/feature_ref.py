"""Where the server looks a request's input up in the feature store, before its backend runs."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FeatureRef(BaseModel):
    """A value history in the feature store: `feature_view:feature_name` for one entity."""

    feature_view: str = Field(min_length=1)
    feature_name: str = Field(min_length=1)
    entity_key: str = Field(min_length=1)
    entity_value: str = Field(min_length=1)
