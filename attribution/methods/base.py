"""The one interface every attribution method implements.

A method is two maps, a query side and a train side, and every score is their inner product:
``score(test)[j, i] = ⟨query(test_j), train(i)⟩``. Top-k search, valuation, self-influence and
group effects are all built on these two sets of vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from attribution.data import Examples, as_examples
from attribution.errors import AttributionError
from attribution.gradients import Featurizer, make_featurizer
from attribution.projectors import derive_seed
from attribution.storage import STORAGE_DTYPES, decode, encode
from attribution.tasks import Measurement, Task


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass
class MethodArguments:
    """Knobs every method shares; subclasses add their own fields."""

    batch_size: int = 64
    storage_dtype: str = "float32"  # train vectors at rest: "float32" or scaled "float16"

    def validate(self) -> None:
        if self.batch_size < 1:
            raise AttributionError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise AttributionError(
                f"storage_dtype must be 'float32' or 'float16', got {self.storage_dtype!r}"
            )


class Method:
    """Base class: ``fit`` stores train-side vectors; queries are projected on demand."""

    name: ClassVar[str] = "method"
    arguments_class: ClassVar[type[MethodArguments]] = MethodArguments
    #: whether queries need fitted state (CG/LiSSA solve with the train Hessian per query)
    query_needs_state: ClassVar[bool] = False
    #: whether the train side can be stored in an index (false when queries need the train set)
    indexable: ClassVar[bool] = True

    def __init__(self, task: Task, device: str | torch.device | None = None, **kwargs: Any) -> None:
        if not isinstance(task, Task):
            raise AttributionError(f"task must be an attribution Task, not {type(task).__name__}")
        try:
            self.args = self.arguments_class(**kwargs)
        except TypeError as err:
            raise AttributionError(f"{type(self).__name__}: {err}") from err
        self.args.validate()
        self.task = task
        self.device = torch.device(device) if device is not None else default_device()
        self.task.model.to(self.device)
        self._train: np.ndarray | None = None  # as stored: see attribution.storage
        self._train_scale = 1.0
        self._state_ready = False
        self.n_train = 0

    # --- public API ----------------------------------------------------------------------
    def fit(self, train: object) -> Method:
        """Compute and keep the train-side vectors of ``train`` (``(X, y)`` or a Dataset).

        Equivalent to the staged path an indexer runs over shards:
        ``prepare`` → ``featurize_train`` per shard → ``observe`` per shard →
        ``finalize_state`` → ``transform_train`` per shard.
        """
        examples = self._examples(train, "train")
        with self.task.lock:  # checkpoints are swapped into the one model in place
            self.prepare(examples)
            raw = self.featurize_train(examples)
            self.observe(raw)
            self.finalize_state()
            vectors = self.transform_train(raw)
        self._train, self._train_scale = encode(vectors, self.args.storage_dtype)
        self.n_train = len(examples)
        return self

    def train_vectors(self) -> np.ndarray:
        """Train-side vectors as float32, one row per training example (n_train, dim).

        With ``storage_dtype="float16"`` they are kept scaled by a power of two and decoded here
        (see :mod:`attribution.storage`); :attr:`stored_train` is the array at rest.
        """
        return decode(self.stored_train, self._train_scale)

    @property
    def stored_train(self) -> np.ndarray:
        """Train vectors as kept in memory (``storage_dtype``, times :attr:`train_scale`)."""
        if self._train is None:
            raise AttributionError(f"{type(self).__name__} is not fitted: call fit(train) first")
        return self._train

    @property
    def train_scale(self) -> float:
        """The power of two :attr:`stored_train` was multiplied by (1 for float32)."""
        return self._train_scale

    def query_vectors(self, data: object, measurement: Measurement = "output") -> np.ndarray:
        """Query-side vectors (n, dim) of ``data``: gradients of its measurement, mapped.

        Safe to call from several threads: the task's lock serialises the checkpoint swaps.
        """
        if self.query_needs_state and not self._state_ready:
            raise AttributionError(
                f"{type(self).__name__} needs fit(train) (or load_state_dict) before queries"
            )
        examples = self._examples(data, "query")
        with self.task.lock:
            queries = self._query(examples, measurement)
        return queries.astype(np.float32, copy=False)

    def score(self, test: object, measurement: Measurement = "output") -> np.ndarray:
        """Scores (n_test, n_train): higher = training example more helpful to the test one."""
        queries = self.query_vectors(test, measurement)
        return queries @ self.train_vectors().T

    def arguments(self) -> dict[str, Any]:
        """Every knob, JSON-friendly, for manifests and results."""
        return {"method": self.name, **dataclasses.asdict(self.args)}

    @property
    def dim(self) -> int:
        """Length of the query and train vectors."""
        return int(self.train_vectors().shape[1])

    # --- staged fitting (what an indexer runs shard by shard) ---------------------------
    def prepare(self, examples: Examples) -> None:
        """Fit state that needs the whole train set itself (e.g. a Hessian). Default: none."""
        self._state_ready = True

    def featurize_train(self, examples: Examples) -> np.ndarray:
        """Raw per-example train features (n, raw_dim); rows are independent (shardable)."""
        raise NotImplementedError

    def observe(self, raw: np.ndarray) -> None:
        """Accumulate statistics of a shard of raw features (e.g. TRAK's ΦᵀΦ). Default: none."""

    def finalize_state(self) -> None:
        """Turn the observed statistics into state (e.g. (ΦᵀΦ + λI)⁻¹). Default: none."""
        self._state_ready = True

    def transform_train(self, raw: np.ndarray) -> np.ndarray:
        """Map raw features to float32 train vectors using the fitted state."""
        return raw.astype(np.float32, copy=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted state needed to transform new train rows and to answer queries."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (no refit needed for queries or adds)."""
        self._state_ready = True

    # --- for subclasses ------------------------------------------------------------------
    def _query(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        raise NotImplementedError

    def _examples(self, data: object, what: str) -> Examples:
        examples = as_examples(data, what=what)
        self.task.check_targets(examples)
        return examples


@dataclasses.dataclass
class GradientArguments(MethodArguments):
    """Knobs of the methods built on (projected) per-example gradients."""

    proj_dim: int | None = None  # None = exact, unprojected gradients (dense path only)
    seed: int = 0
    projection: str = "rademacher"  # or "gaussian"
    gradient: str = "auto"  # "dense" (torch.func), "factored" (LoGra hooks) or "auto"
    checkpoints: list[int] | None = (
        None  # which of the task's checkpoints; None = the method's default
    )

    def validate(self) -> None:
        super().validate()
        if self.proj_dim is not None and self.proj_dim < 1:
            raise AttributionError(f"proj_dim must be positive or None, got {self.proj_dim}")
        if self.projection not in ("rademacher", "gaussian"):
            raise AttributionError(
                f"projection must be 'rademacher' or 'gaussian', not {self.projection!r}"
            )
        if self.gradient not in ("auto", "dense", "factored"):
            raise AttributionError(
                f"gradient must be 'auto', 'dense' or 'factored', not {self.gradient!r}"
            )


class GradientMethod(Method):
    """Shared machinery: per-checkpoint featurizers and the batched featurization loop."""

    arguments_class: ClassVar[type[MethodArguments]] = GradientArguments
    #: checkpoints used when ``checkpoints`` is not given: "all" or "last"
    default_checkpoints: ClassVar[str] = "all"

    def __init__(self, task: Task, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(task, device, **kwargs)
        count = len(task.checkpoints)
        chosen = self.args.checkpoints
        if chosen is None:
            chosen = list(range(count)) if self.default_checkpoints == "all" else [count - 1]
        chosen = [c if c >= 0 else count + c for c in chosen]
        bad = [c for c in chosen if not 0 <= c < count]
        if bad or not chosen:
            raise AttributionError(
                f"checkpoints {self.args.checkpoints} do not name any of the task's {count} checkpoints"
            )
        self.args.checkpoints = chosen
        self._featurizers: dict[int, Featurizer] = {}

    def featurizer(self, checkpoint: int) -> Featurizer:
        """The featurizer of one checkpoint, with its own projection seed (built once)."""
        if checkpoint not in self._featurizers:
            self.task.load_checkpoint(checkpoint)
            self._featurizers[checkpoint] = make_featurizer(
                self.task,
                self.args.gradient,  # type: ignore[arg-type]
                self.args.proj_dim,
                derive_seed(self.args.seed, "checkpoint", checkpoint),
                self.args.projection,  # type: ignore[arg-type]
                self.device,
            )
        return self._featurizers[checkpoint]

    def features(
        self, examples: Examples, checkpoint: int, measurement: Measurement
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Projected) gradients (n, dim) of the measurement and out-to-loss weights q (n,)."""
        featurizer = self.featurizer(checkpoint)
        self.task.load_checkpoint(checkpoint)
        feats, weights = [], []
        for x, y in examples.batches(self.args.batch_size):
            x, y = x.to(self.device), y.to(self.device)
            batch, outputs = featurizer(x, y, measurement)
            feats.append(batch.detach().float().cpu())
            weights.append(self.task.out_to_loss(outputs, y).detach().float().cpu())
        return torch.cat(feats), torch.cat(weights)

    def describe_projection(self) -> dict:
        """How the gradients were projected (for manifests)."""
        return self.featurizer(self.args.checkpoints[0]).describe()
