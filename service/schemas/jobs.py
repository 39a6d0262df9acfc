"""Job requests (one model per kind, chosen by ``kind``) and job state as the API shows it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas.common import ExamplesIn, Page, ProblemOut
from service.schemas.provenance import ProvenanceParams

Method = Literal["trak", "tracin", "graddot", "gradcos", "influence"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodChoice(_Params):
    model: str = Field(description="Registered model name.")
    corpus: str = Field(description="Registered corpus name (the training set).")
    method: Method = "trak"
    method_args: dict[str, Any] = Field(
        default_factory=dict, description="The method's typed arguments (e.g. proj_dim, solver)."
    )


class AttributionParams(MethodChoice):
    """Any method over the whole corpus, for a batch of test examples (exact influence too)."""

    examples: ExamplesIn
    k: int = Field(default=10, ge=1, le=10000, description="Top-k rows kept in the result table.")
    measurement: Literal["output", "loss"] = "output"


class _FromIndexOrModel(_Params):
    index: str | None = Field(default=None, description="Use an index's stored vectors (fast).")
    model: str | None = Field(default=None, description="Or compute: registered model name...")
    corpus: str | None = Field(default=None, description="...with a registered corpus...")
    method: Method = "trak"
    method_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> _FromIndexOrModel:
        if (self.index is None) == (self.model is None or self.corpus is None):
            raise ValueError("give either 'index', or both 'model' and 'corpus'")
        return self


class ValuationParams(_FromIndexOrModel):
    """Value of each training record for a validation set: ⟨Σ_j query(val_j), train(i)⟩."""

    validation: ExamplesIn


class MislabelParams(_FromIndexOrModel):
    """Self-influence ⟨query(i), train(i)⟩ per record; the highest are likely mislabelled."""


class _Retraining(_Params):
    """Retrain a built-in model on random training subsets; record the test outputs/losses."""

    model: str
    corpus: str
    test: ExamplesIn
    num_subsets: int = Field(default=20, ge=3, le=500)
    alpha: float = Field(default=0.5, gt=0, le=1, description="Fraction of the corpus per subset.")
    epochs: int | None = Field(default=None, ge=1, le=10000, description="Retraining epochs.")
    seed: int = Field(default=0, description="Seed of the subsets (SubsetPlan).")


class EvaluateParams(_Retraining):
    """LDS of one or more methods against models retrained on random subsets."""

    methods: list[Method] = Field(default_factory=lambda: ["trak"], min_length=1, max_length=5)
    method_args: dict[str, dict[str, Any]] = Field(default_factory=dict)
    subsets_job: str | None = Field(default=None, max_length=64, description=(
        "Reuse this finished `subsets` job (same model, corpus and test examples) instead of "
        "retraining; its plan replaces num_subsets/alpha/seed/epochs."))


class SubsetsParams(_Retraining):
    """The subset-retraining ground truth itself (what `tda eval lds` and AirRep consume),
    retrained in parallel chunks by the workers."""

    num_subsets: int = Field(default=100, ge=3, le=5000)
    n_seeds: int = Field(default=1, ge=1, le=20, description="Models averaged per subset.")
    chunk_size: int = Field(default=4, ge=1, le=1000, description="Subsets per worker task.")


class BuildIndexParams(_Params):
    """Featurize a corpus with a method and publish a new index version."""

    name: str = Field(description="Index name (a new version if it exists).")
    model: str
    corpus: str
    method: Method = "trak"
    method_args: dict[str, Any] = Field(default_factory=dict)
    index_kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttributionJob(_Job):
    kind: Literal["attribution"]
    params: AttributionParams


class ValuationJob(_Job):
    kind: Literal["valuation"]
    params: ValuationParams


class MislabelJob(_Job):
    kind: Literal["mislabel"]
    params: MislabelParams


class EvaluateJob(_Job):
    kind: Literal["evaluate"]
    params: EvaluateParams


class SubsetsJob(_Job):
    kind: Literal["subsets"]
    params: SubsetsParams


class BuildIndexJob(_Job):
    kind: Literal["build_index"]
    params: BuildIndexParams


class ProvenanceJob(_Job):
    kind: Literal["provenance"]
    params: ProvenanceParams


JobRequest = Annotated[
    AttributionJob | ValuationJob | MislabelJob | EvaluateJob | SubsetsJob | BuildIndexJob
    | ProvenanceJob,
    Field(discriminator="kind"),
]


class Progress(BaseModel):
    fraction: float = Field(ge=0, le=1)
    stage: str


class ResultInfo(BaseModel):
    rows: int
    columns: list[str]
    arrays: dict[str, list[int]] = Field(description="Name → shape of the NumPy arrays stored.")
    summary: dict[str, Any]


class JobOut(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue: str
    progress: Progress
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(description="Times a worker started this job.")
    cancel_requested: bool = False
    error: ProblemOut | None = None
    result: ResultInfo | None = None
    links: dict[str, str]


class JobList(BaseModel):
    items: list[JobOut]
    page: Page


class ResultPage(BaseModel):
    job_id: str
    items: list[dict[str, Any]]
    page: Page
    summary: dict[str, Any]
