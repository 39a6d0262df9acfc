"""Shapes shared by several resources: examples on the wire, problems, pages."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ExamplesIn(BaseModel):
    """A batch of examples: one flat input row per example and its label/target.

    Rows are reshaped to the model card's ``input_shape`` (e.g. 64 → 1×8×8) and cast to the
    corpus's input dtype (token ids become integers). ``y`` may be omitted for causal-LM models
    (the labels are then the inputs).
    """

    model_config = ConfigDict(extra="forbid")
    x: list[list[float]] = Field(min_length=1, description="Inputs, one flat row per example.")
    y: list[float | list[float]] | None = Field(
        default=None, description="Labels (classification), targets (regression) or token labels."
    )


class ProblemOut(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``)."""

    type: str = Field(description="URI naming the kind of problem (about:blank for plain HTTP).")
    title: str
    status: int | None = None
    detail: str = Field(description="What was wrong and what to do instead.")
    instance: str | None = None


class Page(BaseModel):
    """Where a page sits in a listing."""

    offset: int
    limit: int
    total: int
    next: str | None = Field(default=None, description="URL of the next page, if any.")


class Deleted(BaseModel):
    name: str
    deleted: bool = True


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ProblemOut, "content": {"application/problem+json": {}},
           "description": desc}
    for code, desc in {
        400: "Malformed request (e.g. invalid JSON)",
        401: "Missing or unknown API key",
        403: "The key lacks the scope, or the path is outside the data root",
        404: "No such resource for this tenant",
        413: "Request body too large",
        422: "The request is well-formed but its content is wrong",
        429: "Rate limit exceeded",
    }.items()
}
