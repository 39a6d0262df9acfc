"""Provenance of an LLM output: request, verbatim spans, attribution and merged documents."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from indexer.verbatim import MAX_OUTPUT_CHARS

MAX_PROMPT_CHARS = 100_000


class ProvenanceOptionsIn(BaseModel):
    """How much to return (shared by the synchronous route and the batch job)."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=10, ge=1, le=1000, description="Documents kept by attribution.")
    max_docs_per_span: int = Field(default=5, ge=0, le=100,
                                   description="Documents listed per verbatim span.")
    min_span_tokens: int = Field(default=3, ge=1, le=100,
                                 description="Shortest span reported, in words/punctuation.")
    max_span_count: int = Field(default=1000, ge=1, le=100_000,
                                description="Spans occurring more often are common phrases.")
    context_chars: int = Field(default=80, ge=0, le=1000,
                               description="Characters of context around a match in snippets.")


class ProvenanceItem(BaseModel):
    """One generation: the prompt it answered and the output to trace."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS,
                        description="What the model was asked (conditions the output).")
    output: str = Field(min_length=1, max_length=MAX_OUTPUT_CHARS,
                        description="The generated text whose sources are wanted.")

    @field_validator("output")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the output is empty (only whitespace): there is nothing to trace")
        return value


class ProvenanceRequest(ProvenanceItem, ProvenanceOptionsIn):
    """``POST /v1/provenance``: one (prompt, output) against one causal-LM index."""

    index: str = Field(description="A published index built from a causal-LM text corpus.")
    attribution: bool = Field(default=True,
                              description="Also rank documents by gradient attribution.")


class SpanDocumentOut(BaseModel):
    id: str
    start: int = Field(description="Character offset of the match in the document.")
    end: int
    snippet: str | None = Field(description="Context around the match; null when blocked.")
    metadata: dict[str, Any]
    blocked: bool = Field(description="Named by the takedown list: snippet withheld.")


class SpanOut(BaseModel):
    start: int = Field(description="Character offset of the span in the output.")
    end: int
    text: str
    num_tokens: int
    count: int = Field(description="Occurrences in the corpus.")
    unigram_logprob: float = Field(description="Σ log p(token) of the span: lower is rarer.")
    documents: list[SpanDocumentOut]


class AttributedDocumentOut(BaseModel):
    id: str
    score: float = Field(description="⟨query, train⟩ for log p(output | prompt).")
    rank: int
    metadata: dict[str, Any]
    blocked: bool


class AttributionOut(BaseModel):
    status: Literal["done", "queued", "skipped"]
    method: str | None = None
    measurement: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    truncated: bool | None = Field(
        default=None, description="Prompt (then output) cut to the model's context.")
    documents: list[AttributedDocumentOut] = Field(default_factory=list)
    job_id: str | None = Field(default=None, description="When queued: the provenance job.")
    location: str | None = Field(default=None, description="When queued: where to poll it.")
    reason: str | None = None


class MergedSpanOut(BaseModel):
    span: int = Field(description="Position of the span in ``spans``.")
    text: str
    output_start: int
    output_end: int
    document_start: int
    document_end: int
    snippet: str | None


class MergedDocumentOut(BaseModel):
    id: str
    metadata: dict[str, Any]
    blocked: bool
    spans: list[MergedSpanOut]
    matched_tokens: int
    attribution_score: float | None
    attribution_rank: int | None


class ProvenanceResponse(BaseModel):
    index: str
    version: str
    options: dict[str, Any]
    spans: list[SpanOut]
    attribution: AttributionOut
    documents: list[MergedDocumentOut] = Field(
        description="Union of span and attribution documents: verbatim evidence first.")


class ProvenanceParams(ProvenanceOptionsIn):
    """The ``provenance`` job: many (prompt, output) pairs against one causal-LM index."""

    index: str = Field(description="A published index built from a causal-LM text corpus.")
    items: list[ProvenanceItem] = Field(min_length=1, max_length=1000)
