"""How good are the scores? Counterfactual retraining and the yardsticks built on it.

* **LDS** (linear datamodeling score, Park et al. 2023): draw M random subsets S_k of size
  α·n, retrain on each, and per test example j compare the *predicted* effect of the subset,
  τ_j(S_k) = Σ_{i∈S_k} scores[j, i], with the retrained model's output f_j(θ_{S_k}), by the
  Spearman rank correlation across k; LDS is the mean over test examples.
* **LOO correlation**: retrain without single examples i and correlate scores[j, i] with the
  actual change f_j(θ_full) − f_j(θ_{−i}).
* **Mislabel AUC**: ROC AUC of self-influence as a detector of flipped labels.

The subset retraining is split into independent units — one subset ``k`` per call of
:func:`retrain_subset`, deterministic in (plan, k) alone — so workers can run them in parallel and
AirRep can reuse the (mask, outputs) pairs as its training targets.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.files import atomic_write
from attribution.tasks import Task
from attribution.training import TaskFactory, TrainConfig, evaluate_outputs, torch_threads, train

ModelFactory = Callable[[int], nn.Module]
"""seed → freshly initialised model (e.g. ``lambda seed: models.mlp(seed=seed)``)."""


# --- the subsets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubsetPlan:
    """M random subsets of round(α·n) training examples; subset k depends on (seed, k) only."""

    n_train: int
    alpha: float = 0.5
    n_subsets: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_train < 2:
            raise AttributionError(f"n_train must be at least 2, got {self.n_train}")
        if not 0.0 < self.alpha <= 1.0:
            raise AttributionError(f"alpha must lie in (0, 1], got {self.alpha}")
        if self.n_subsets < 1:
            raise AttributionError(f"n_subsets must be at least 1, got {self.n_subsets}")
        if self.subset_size < 1:
            raise AttributionError(
                f"alpha={self.alpha} of n_train={self.n_train} leaves an empty subset"
            )

    @property
    def subset_size(self) -> int:
        return round(self.alpha * self.n_train)

    def mask(self, k: int) -> np.ndarray:
        """Boolean mask (n_train,) of subset k: exactly ``subset_size`` examples, seeded by (seed, k)."""
        if not 0 <= k < self.n_subsets:
            raise AttributionError(f"subset index k={k} is outside [0, {self.n_subsets - 1}]")
        rng = np.random.default_rng([self.seed, k])
        chosen = rng.choice(self.n_train, size=self.subset_size, replace=False)
        mask = np.zeros(self.n_train, dtype=bool)
        mask[chosen] = True
        return mask

    def masks(self) -> np.ndarray:
        """All masks stacked, (n_subsets, n_train) bool."""
        return np.stack([self.mask(k) for k in range(self.n_subsets)])

    def model_seed(self, k: int, replicate: int, base_seed: int = 0) -> int:
        """Seed of replicate ``replicate`` trained on subset k (init and minibatch order)."""
        state = np.random.SeedSequence([base_seed, self.seed, k, replicate]).generate_state(1)
        return int(state[0])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SubsetOutcome:
    """The retrained models' outputs f and losses L on the test set for subset k (seed-averaged)."""

    k: int
    mask: np.ndarray  # (n_train,) bool
    outputs: np.ndarray  # (n_test,)
    losses: np.ndarray  # (n_test,)


@dataclass
class SubsetResults:
    """Stacked outcomes: masks (M, n_train), outputs and losses (M, n_test), subset ids (M,)."""

    masks: np.ndarray
    outputs: np.ndarray
    losses: np.ndarray
    subset_ids: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks).astype(bool, copy=False)
        self.outputs = np.asarray(self.outputs, dtype=np.float64)
        self.losses = np.asarray(self.losses, dtype=np.float64)
        self.subset_ids = np.asarray(self.subset_ids, dtype=np.int64)
        if self.masks.ndim != 2 or self.outputs.ndim != 2 or self.losses.ndim != 2:
            raise AttributionError(
                "masks, outputs and losses must be 2-D (subsets × examples), got shapes "
                f"{self.masks.shape}, {self.outputs.shape}, {self.losses.shape}"
            )
        m = self.masks.shape[0]
        if self.outputs.shape[0] != m or self.losses.shape[0] != m or self.subset_ids.shape != (m,):
            raise AttributionError(
                f"got {m} masks but {self.outputs.shape[0]} output rows, {self.losses.shape[0]} "
                f"loss rows and {self.subset_ids.shape} subset ids; give one of each per subset"
            )
        if self.outputs.shape != self.losses.shape:
            raise AttributionError(
                f"outputs {self.outputs.shape} and losses {self.losses.shape} differ in shape"
            )

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @classmethod
    def from_outcomes(
        cls, outcomes: Iterable[SubsetOutcome], meta: dict | None = None
    ) -> SubsetResults:
        """Stack per-subset outcomes (e.g. from parallel workers), ordered by subset id."""
        items = sorted(outcomes, key=lambda o: o.k)
        if not items:
            raise AttributionError("no subset outcomes to stack")
        ids = [o.k for o in items]
        if len(set(ids)) != len(ids):
            raise AttributionError(f"duplicate subset ids among the outcomes: {ids}")
        return cls(
            masks=np.stack([o.mask for o in items]),
            outputs=np.stack([o.outputs for o in items]),
            losses=np.stack([o.losses for o in items]),
            subset_ids=np.array(ids),
            meta=dict(meta or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically: a temporary file in the same folder, then os.replace."""
        return atomic_write(path, lambda handle: np.savez(
            handle,
            masks=self.masks,
            outputs=self.outputs,
            losses=self.losses,
            subset_ids=self.subset_ids,
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        ))

    @classmethod
    def load(cls, path: str | Path) -> SubsetResults:
        """Read what :meth:`save` wrote (no pickle)."""
        path = Path(path)
        if not path.is_file():
            raise AttributionError(f"subset results file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"masks", "outputs", "losses", "subset_ids"} - set(data.files)
                if missing:
                    raise AttributionError(f"{path} lacks the arrays {sorted(missing)}")
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
                return cls(data["masks"], data["outputs"], data["losses"], data["subset_ids"], meta)
        except AttributionError:
            raise
        except (OSError, ValueError) as err:
            raise AttributionError(f"{path} is not a readable subset results file: {err}") from err


# --- retraining ----------------------------------------------------------------------------------
def _check_sets(train_set: Examples, test_set: Examples) -> None:
    if len(train_set) == 0:
        raise AttributionError("the train set is empty")
    if len(test_set) == 0:
        raise AttributionError("the test set is empty")


def _train_and_measure(
    seed: int,
    make_model: ModelFactory,
    task: TaskFactory,
    train_set: Examples,
    test_set: Examples,
    config: TrainConfig,
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(task, Task):
        raise AttributionError(
            "retraining needs a Task class or factory (e.g. ClassificationTask), not a Task "
            "instance: each retrained model is wrapped afresh"
        )
    model = make_model(seed)
    with torch_threads(config.num_threads):  # same threads, same bits: measured like trained
        train(model, task, train_set, dataclasses.replace(config, seed=seed))
        outputs, losses = evaluate_outputs(model, task, test_set)
    return outputs.double().numpy(), losses.double().numpy()


def retrain_subset(
    plan: SubsetPlan,
    k: int,
    make_model: ModelFactory,
    task: TaskFactory,
    train_set: Examples,
    test_set: Examples,
    config: TrainConfig | None = None,
    n_seeds: int = 1,
) -> SubsetOutcome:
    """Train on subset k (``n_seeds`` replicates), return the mean test outputs f and losses L.

    Replicate r uses seed ``plan.model_seed(k, r, config.seed)`` for both the initialisation
    (``make_model(seed)``) and the minibatch order, so the outcome depends on (plan, k) only.
    """
    config = config or TrainConfig()
    _check_sets(train_set, test_set)
    if len(train_set) != plan.n_train:
        raise AttributionError(
            f"the plan is for {plan.n_train} training examples but the train set has {len(train_set)}"
        )
    if n_seeds < 1:
        raise AttributionError(f"n_seeds must be at least 1, got {n_seeds}")
    mask = plan.mask(k)
    subset = train_set.subset(mask)
    runs = [
        _train_and_measure(
            plan.model_seed(k, r, config.seed), make_model, task, subset, test_set, config
        )
        for r in range(n_seeds)
    ]
    outputs = np.mean([o for o, _ in runs], axis=0)
    losses = np.mean([lo for _, lo in runs], axis=0)
    return SubsetOutcome(k, mask, outputs, losses)


def retrain_on_subsets(
    plan: SubsetPlan,
    make_model: ModelFactory,
    task: TaskFactory,
    train_set: Examples,
    test_set: Examples,
    config: TrainConfig | None = None,
    n_seeds: int = 1,
    subsets: Sequence[int] | None = None,
    progress: bool = True,
) -> SubsetResults:
    """Run :func:`retrain_subset` for every k of the plan (or the given ``subsets``) and stack."""
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    ks = list(range(plan.n_subsets)) if subsets is None else [int(k) for k in subsets]
    outcomes = [
        retrain_subset(plan, k, make_model, task, train_set, test_set, config, n_seeds)
        for k in tqdm(ks, desc="retraining on subsets", disable=not progress)
    ]
    meta = {"plan": plan.to_dict(), "config": config.to_dict(), "n_seeds": n_seeds}
    return SubsetResults.from_outcomes(outcomes, meta)


# --- LDS -----------------------------------------------------------------------------------------
@dataclass
class LDSResult:
    """Mean Spearman correlation over test examples; ``per_test`` holds NaN where undefined."""

    mean: float
    per_test: np.ndarray
    n_undefined: int  # test examples whose outputs or predictions are constant across subsets


def _finite_2d(array: object, name: str) -> np.ndarray:
    value = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if value.ndim != 2:
        raise AttributionError(f"{name} must be 2-D, got shape {value.shape}")
    if value.dtype == bool:
        return value
    if not np.issubdtype(value.dtype, np.number):
        raise AttributionError(f"{name} must be numeric, got dtype {value.dtype}")
    value = value.astype(np.float64, copy=False)
    if not np.isfinite(value).all():
        raise AttributionError(f"{name} contains NaN or infinite values")
    return value


def _as_masks(masks: object, name: str = "masks") -> np.ndarray:
    value = _finite_2d(masks, name)
    if value.dtype != bool:
        if not np.isin(value, (0.0, 1.0)).all():
            raise AttributionError(f"{name} must be boolean or 0/1 (membership of each subset)")
        value = value.astype(bool)
    return value


def _columnwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of a and b (NaN where a column is constant)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a * b).sum(axis=0) / denom
    corr[denom <= 1e-300] = np.nan
    return corr


def lds(scores: object, masks: object, outputs: object) -> LDSResult:
    """Linear datamodeling score.

    τ[k, j] = Σ_{i∈S_k} scores[j, i]  (predicted effect of subset k on test j)
    LDS_j  = Spearman_k(τ[k, j], outputs[k, j]),  LDS = mean_j LDS_j  (NaN ones skipped).

    Shapes: scores (n_test, n_train), masks (M, n_train) bool, outputs (M, n_test).
    """
    scores = _finite_2d(scores, "scores").astype(np.float64)
    masks = _as_masks(masks)
    outputs = _finite_2d(outputs, "outputs").astype(np.float64)
    n_test, n_train = scores.shape
    if masks.shape[1] != n_train:
        raise AttributionError(
            f"scores cover {n_train} training examples but masks cover {masks.shape[1]}"
        )
    if outputs.shape[0] != masks.shape[0]:
        raise AttributionError(
            f"got {masks.shape[0]} subset masks but {outputs.shape[0]} rows of outputs; "
            "give one row of test outputs per subset"
        )
    if outputs.shape[1] != n_test:
        raise AttributionError(
            f"scores are for {n_test} test examples but outputs for {outputs.shape[1]}"
        )
    if masks.shape[0] < 3:
        raise AttributionError(f"LDS needs at least 3 subsets, got {masks.shape[0]}")
    predicted = masks.astype(np.float64) @ scores.T  # (M, n_test)
    per_test = _columnwise_corr(rankdata(predicted, axis=0), rankdata(outputs, axis=0))
    undefined = int(np.isnan(per_test).sum())
    mean = float(np.nanmean(per_test)) if undefined < n_test else float("nan")
    return LDSResult(mean, per_test, undefined)


# --- leave-one-out -------------------------------------------------------------------------------
@dataclass
class LOOResult:
    """deltas[j, r] = f_j(θ_full) − f_j(θ_{−indices[r]}): > 0 means the example helped test j."""

    indices: np.ndarray  # (R,)
    deltas: np.ndarray  # (n_test, R)
    base_outputs: np.ndarray  # (n_test,)


def leave_one_out(
    make_model: ModelFactory,
    task: TaskFactory,
    train_set: Examples,
    test_set: Examples,
    indices: Sequence[int],
    config: TrainConfig | None = None,
    n_seeds: int = 1,
    progress: bool = True,
) -> LOOResult:
    """Retrain without each training example in ``indices``; the actual change of each output.

    The full model and every leave-one-out model of replicate r share the seed
    ``config.seed + r`` (same initialisation), so the difference isolates the removed example;
    full-batch training (``batch_size=None``) keeps the update sequence otherwise identical.
    Deltas are averaged over the ``n_seeds`` replicates.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    _check_sets(train_set, test_set)
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(train_set)
    if index.size == 0:
        raise AttributionError("indices is empty: name at least one training example to remove")
    if index.min() < 0 or index.max() >= n:
        raise AttributionError(
            f"indices must lie in [0, {n - 1}], got [{index.min()}, {index.max()}]"
        )
    if len(np.unique(index)) != index.size:
        raise AttributionError("indices contains duplicates")
    if n < 2:
        raise AttributionError("leave-one-out needs at least 2 training examples")
    if n_seeds < 1:
        raise AttributionError(f"n_seeds must be at least 1, got {n_seeds}")
    base = np.zeros(len(test_set))
    deltas = np.zeros((len(test_set), index.size))
    bar = tqdm(total=n_seeds * (index.size + 1), desc="leave-one-out", disable=not progress)
    for r in range(n_seeds):
        seed = config.seed + r
        full, _ = _train_and_measure(seed, make_model, task, train_set, test_set, config)
        bar.update()
        base += full / n_seeds
        for col, i in enumerate(index):
            keep = np.ones(n, dtype=bool)
            keep[i] = False
            without, _ = _train_and_measure(
                seed, make_model, task, train_set.subset(keep), test_set, config
            )
            deltas[:, col] += (full - without) / n_seeds
            bar.update()
    bar.close()
    return LOOResult(index, deltas, base)


def loo_correlation(
    scores: object,
    indices: Sequence[int],
    loo_deltas: object,
    kind: Literal["pearson", "spearman"] = "pearson",
) -> float:
    """Mean over test examples j of corr_r(scores[j, indices[r]], loo_deltas[j, r]).

    Pearson by default (as in Koh & Liang 2017), Spearman with ``kind="spearman"``; test
    examples with constant scores or deltas are skipped.
    """
    scores = _finite_2d(scores, "scores").astype(np.float64)
    deltas = _finite_2d(loo_deltas, "loo_deltas").astype(np.float64)
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    if kind not in ("pearson", "spearman"):
        raise AttributionError(f"kind must be 'pearson' or 'spearman', got {kind!r}")
    if index.size < 3:
        raise AttributionError(f"a correlation needs at least 3 removed examples, got {index.size}")
    if index.min() < 0 or index.max() >= scores.shape[1]:
        raise AttributionError(
            f"indices must lie in [0, {scores.shape[1] - 1}] (the scores' training examples)"
        )
    if deltas.shape != (scores.shape[0], index.size):
        raise AttributionError(
            f"loo_deltas must have shape (n_test, len(indices)) = {(scores.shape[0], index.size)}, "
            f"got {deltas.shape}"
        )
    predicted = scores[:, index].T  # (R, n_test)
    actual = deltas.T
    if kind == "spearman":
        predicted, actual = rankdata(predicted, axis=0), rankdata(actual, axis=0)
    per_test = _columnwise_corr(predicted, actual)
    if np.isnan(per_test).all():
        raise AttributionError("every test example has constant scores or deltas: no correlation")
    return float(np.nanmean(per_test))


# --- mislabel detection --------------------------------------------------------------------------
def mislabel_auc(self_influence: object, flipped: object) -> float:
    """ROC AUC of ranking training examples by self-influence (higher = more suspicious)
    against the truth ``flipped``: P(score of a flipped example > score of a clean one)."""
    from sklearn.metrics import roc_auc_score

    def as_1d(value: object, name: str) -> np.ndarray:
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if array.ndim != 1:
            raise AttributionError(
                f"{name} must be 1-D (one value per training example), got {array.shape}"
            )
        return array

    scores = as_1d(self_influence, "self_influence").astype(np.float64)
    truth = as_1d(flipped, "flipped")
    if scores.shape != truth.shape:
        raise AttributionError(
            f"self_influence has {scores.shape[0]} values but flipped has {truth.shape[0]}"
        )
    if not np.isfinite(scores).all():
        raise AttributionError("self_influence contains NaN or infinite values")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise AttributionError("flipped must be boolean or 0/1")
        truth = truth.astype(bool)
    if truth.all() or not truth.any():
        raise AttributionError(
            "flipped must mark some examples but not all: AUC needs both classes"
        )
    return float(roc_auc_score(truth, scores))


__all__ = [
    "LDSResult",
    "LOOResult",
    "ModelFactory",
    "SubsetOutcome",
    "SubsetPlan",
    "SubsetResults",
    "leave_one_out",
    "lds",
    "loo_correlation",
    "mislabel_auc",
    "retrain_on_subsets",
    "retrain_subset",
]
