"""Built-in evaluation tasks: data, trained models and LDS ground truth, ready to score methods.

``tda eval lds``, the demo and ``benchmarks/`` share this, so every figure they print comes from
the same models and subsets. A built-in task trains ``n_models`` independent models (seeds
0..n−1; TRAK and influence ensemble over them) plus a checkpointed trajectory of model 0 for
TracIn, and caches the subset-retraining ground truth as ``.npz``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from attribution import datasets, models
from attribution.checkpoints import Checkpoint
from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.evaluate import SubsetPlan, SubsetResults, lds, retrain_on_subsets
from attribution.methods import Method, build_method
from attribution.tasks import ClassificationTask
from attribution.training import DIGITS_LOGREG_CONFIG, DIGITS_MLP_CONFIG, TrainConfig, train


@dataclass(frozen=True)
class BuiltinTask:
    """A small classification problem with a fixed split and a training recipe."""

    name: str
    make_model: Callable[[int], nn.Module]
    config: TrainConfig
    load: Callable[[], tuple[Examples, Examples]]


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "digits-mlp": BuiltinTask(
        "digits-mlp",
        lambda seed: models.mlp(seed=seed),
        DIGITS_MLP_CONFIG,
        datasets.load_digits_split,
    ),
    "digits-logreg": BuiltinTask(
        "digits-logreg",
        lambda seed: models.logistic_regression(64, 10, seed=seed),
        DIGITS_LOGREG_CONFIG,
        datasets.load_digits_split,
    ),
}

#: the methods ``tda eval lds`` and the demo compare, by label → (registry name, arguments)
DEFAULT_METHODS: dict[str, tuple[str, dict]] = {
    "graddot": ("graddot", {}),
    "gradcos": ("gradcos", {}),
    "tracin": ("tracin", {"proj_dim": 512}),
    "trak-512": ("trak", {"proj_dim": 512}),
    "influence-ekfac": ("influence", {"solver": "ekfac"}),
    "influence-exact": ("influence", {"solver": "exact", "checkpoints": [0]}),
}

#: methods that use the checkpointed trajectory of model 0 rather than the ensemble
TRAJECTORY_METHODS = {"tracin"}


@dataclass
class Prepared:
    """A built-in task with its data and trained models."""

    task: BuiltinTask
    train: Examples
    test: Examples
    ensemble: list[dict]  # final state dicts of independently trained models
    trajectory: list[Checkpoint]  # checkpoints of model 0 along training, with learning rates

    def attribution_task(self, method: str, n_models: int | None = None) -> ClassificationTask:
        """A Task wrapping the right checkpoints for ``method`` (trajectory or ensemble)."""
        model = self.task.make_model(0)
        if method in TRAJECTORY_METHODS:
            return ClassificationTask(model, checkpoints=self.trajectory)
        return ClassificationTask(
            model, checkpoints=self.ensemble[: n_models or len(self.ensemble)]
        )


def get_task(name: str) -> BuiltinTask:
    """A built-in task by name, with a clear error listing the others."""
    if name not in BUILTIN_TASKS:
        raise AttributionError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


def prepare(name: str, n_models: int = 5, trajectory_checkpoints: int = 5) -> Prepared:
    """Load the data and train ``n_models`` models (plus model 0's checkpointed trajectory)."""
    return prepare_task(get_task(name), n_models, trajectory_checkpoints)


def prepare_task(task: BuiltinTask, n_models: int = 5, trajectory_checkpoints: int = 5) -> Prepared:
    """As :func:`prepare`, for any :class:`BuiltinTask` (e.g. one with flipped labels)."""
    train_set, test_set = task.load()
    ensemble, trajectory = [], []
    for seed in range(n_models):
        model = task.make_model(seed)
        keep = trajectory_checkpoints if seed == 0 else 1
        result = train(
            model,
            ClassificationTask,
            train_set,
            dataclasses.replace(task.config, seed=seed, checkpoints=keep),
        )
        ensemble.append(result.state_dict)
        if seed == 0:
            trajectory = result.checkpoints
    return Prepared(task, train_set, test_set, ensemble, trajectory)


def ground_truth(
    prepared: Prepared,
    n_subsets: int = 100,
    alpha: float = 0.5,
    cache: Path | None = None,
    progress: bool = True,
) -> SubsetResults:
    """Outputs of models retrained on random α-subsets (cached in ``cache`` when given)."""
    plan = SubsetPlan(len(prepared.train), alpha, n_subsets, seed=0)
    if cache is not None and cache.exists():
        results = SubsetResults.load(cache)
        same_recipe = results.meta.get("config") == prepared.task.config.to_dict()
        if same_recipe and results.masks.shape == (n_subsets, len(prepared.train)):
            return results
    results = retrain_on_subsets(
        plan,
        prepared.task.make_model,
        ClassificationTask,
        prepared.train,
        prepared.test,
        prepared.task.config,
        progress=progress,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        results.save(cache)
    return results


@dataclass
class MethodReport:
    """One method's quality and cost on a built-in task."""

    label: str
    lds: float
    seconds: float
    method: Method


def fit_method(prepared: Prepared, name: str, arguments: dict) -> Method:
    """Build ``name`` on the right checkpoints of the task and fit it on the train set."""
    return build_method(name, prepared.attribution_task(name), **arguments).fit(prepared.train)


def evaluate_method(
    prepared: Prepared, truth: SubsetResults, label: str, name: str, arguments: dict
) -> MethodReport:
    """Fit ``name`` on the train set, score the test set, and compute its LDS."""
    start = time.perf_counter()
    method = fit_method(prepared, name, arguments)
    scores = method.score(prepared.test)
    seconds = time.perf_counter() - start
    return MethodReport(label, lds(scores, truth.masks, truth.outputs).mean, seconds, method)


def test_accuracy(prepared: Prepared) -> float:
    """Accuracy of model 0 on the test split."""
    model = prepared.task.make_model(0)
    model.load_state_dict(prepared.ensemble[0])
    model.eval()
    predictions = model(prepared.test.x).argmax(1)
    return float((predictions == prepared.test.y).float().mean())


def top_examples(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest (proponents) and k lowest (opponents) scores per row."""
    order = np.argsort(-scores, axis=1)
    return order[:, :k], order[:, ::-1][:, :k]
