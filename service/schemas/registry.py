"""Models, corpora, files and indexes as the registries show them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.registry import NAME_PATTERN

NAME = Field(pattern=NAME_PATTERN.pattern, description="Letters, digits, '.', '_', '-'.")


class RegisterRequest(BaseModel):
    """Register a file already in the tenant's file area (uploaded with PUT /v1/files/...)."""

    model_config = ConfigDict(extra="forbid")
    name: str = NAME
    path: str = Field(min_length=1, description="Path relative to your file area.")


class ModelOut(BaseModel):
    name: str
    path: str = Field(description="Model card, relative to your file area.")
    task: str
    architecture: dict[str, Any]
    checkpoints: int
    input_shape: list[int] | None = None
    fingerprint: str = Field(description="sha256 of architecture, task and weights.")
    registered_at: float


class CorpusOut(BaseModel):
    name: str
    path: str = Field(description="Corpus file, relative to your file area.")
    format: str
    records: int
    columns: list[str]
    input_size: int | None = Field(default=None, description="Values per input row, if known.")
    bytes: int
    sha256: str
    registered_at: float


class FileOut(BaseModel):
    path: str = Field(description="Relative to your file area.")
    bytes: int
    modified: float


class IndexOut(BaseModel):
    """A published index (its current version)."""

    name: str
    version: str
    method: str
    records: int
    dim: int
    kind: str = Field(description="FAISS index kind (flat, ivf, hnsw, ...).")
    built_at: float | None = None
    manifest: dict[str, Any] | None = Field(default=None, description="Full manifest (inspect).")
