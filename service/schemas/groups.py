"""Group attribution against a published index: which group of training records (a source,
a label, any id list) contributed most to each example."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas.common import ExamplesIn

Pooling = Literal["attention", "sum", "mean"]
MAX_GROUPS = 1000


class GroupIn(BaseModel):
    """One group: ``ids``, or every record with ``label``, or every record whose metadata
    ``field`` equals ``value`` — exactly one of the three."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="Unique name in this request.")
    ids: list[str] | None = Field(default=None, max_length=100_000, description="Record ids.")
    label: int | str | None = Field(default=None, description="Every record with this label.")
    field: str | None = Field(default=None, min_length=1, max_length=200,
                              description="A metadata field (e.g. 'source')...")
    value: Any = Field(default=None, description="...and the value its records share.")

    @model_validator(mode="after")
    def _one_selector(self) -> GroupIn:
        given = [self.ids is not None, self.label is not None, self.field is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of 'ids', 'label' or 'field' (with 'value')")
        if self.field is None and self.value is not None:
            raise ValueError("'value' goes with 'field'")
        return self


class GroupsRequest(BaseModel):
    """Examples in; for each, the groups ranked by their pooled attribution score."""

    model_config = ConfigDict(extra="forbid")
    examples: ExamplesIn
    groups: list[GroupIn] | None = Field(default=None, min_length=1, max_length=MAX_GROUPS,
                                         description="Named groups to score...")
    by: str | None = Field(default=None, min_length=1, max_length=200, description=(
        "...or one group per distinct value of this metadata field ('label': per class)."))
    pooling: Pooling | None = Field(default=None, description=(
        "attention: Σ softmax(|s|)ᵢ sᵢ (AirRep); sum: Σ sᵢ, the group effect; mean: Σ sᵢ / n. "
        "Default: attention for AirRep indexes, sum otherwise."))
    measurement: Literal["output", "loss"] = "output"
    k: int | None = Field(default=None, ge=1, description="Keep the k best groups per example "
                          "(default: all).")

    @model_validator(mode="after")
    def _groups_or_by(self) -> GroupsRequest:
        if (self.groups is None) == (self.by is None):
            raise ValueError("give either 'groups' or 'by'")
        return self


class GroupScore(BaseModel):
    name: str
    score: float
    rank: int = Field(description="1 = contributed most.")
    size: int = Field(description="Live records in the group.")
    pooling: Pooling


class GroupsResult(BaseModel):
    groups: list[GroupScore] = Field(description="Highest score first.")


class GroupsResponse(BaseModel):
    index: str
    version: str
    method: str
    pooling: Pooling
    results: list[GroupsResult] = Field(description="One entry per example, in request order.")
