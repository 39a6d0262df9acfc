"""Top-k queries against a published index."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TopKExamples(BaseModel):
    """Examples as input rows (``x``: features or token ids) or as ``text``, with labels.

    ``text`` is tokenised in the API with the tokenizer the index's model card names (the
    corpus's own tokenizer); for a causal-LM model the text's tokens are also its labels.
    """

    model_config = ConfigDict(extra="forbid")
    x: list[list[float]] | None = Field(
        default=None, min_length=1, description="Inputs, one flat row per example."
    )
    text: list[str] | None = Field(
        default=None, min_length=1,
        description="Texts, one per example (for indexes whose model card names a tokenizer).",
    )
    y: list[float | list[float]] | None = Field(
        default=None, description="Labels (classification), targets (regression) or token labels."
    )

    @model_validator(mode="after")
    def _one_input(self) -> TopKExamples:
        if (self.x is None) == (self.text is None):
            raise ValueError("give the examples either as 'x' (input rows) or as 'text', "
                             "exactly one of the two")
        return self

    def __len__(self) -> int:
        return len(self.x if self.x is not None else self.text or [])


class TopKRequest(BaseModel):
    """Examples in; for each, the k most helpful (and, on request, most harmful) records."""

    model_config = ConfigDict(extra="forbid")
    examples: TopKExamples
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
