"""Top-k queries against a published index."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import ExamplesIn


class TopKRequest(BaseModel):
    """Examples in; for each, the k most helpful (and, on request, most harmful) records."""

    model_config = ConfigDict(extra="forbid")
    examples: ExamplesIn
    k: int = Field(default=10, ge=1, description="Records per example (at most TDA_MAX_TOPK_K).")
    opponents: bool = Field(default=False, description="Also return the k most negative.")
    measurement: Literal["output", "loss"] = Field(
        default="output", description="Attribute the model output (margin) or the loss."
    )
    metadata: bool = Field(default=True, description="Include each record's metadata.")


class Neighbor(BaseModel):
    id: str
    score: float
    rank: int = Field(description="1 = strongest.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class TopKResult(BaseModel):
    proponents: list[Neighbor]
    opponents: list[Neighbor] | None = None


class TopKResponse(BaseModel):
    index: str
    version: str
    method: str
    k: int
    results: list[TopKResult] = Field(description="One entry per example, in request order.")
