"""Each method's LDS against real retraining on a small digits problem (printed, and bounded).

Small sizes so it runs in the suite; benchmarks/engine_bench.py measures the full setup.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attribution import ClassificationTask, build_method, models, self_influence
from attribution.datasets import flip_labels, load_digits_split
from attribution.evaluate import SubsetPlan, lds, mislabel_auc, retrain_on_subsets
from attribution.training import DIGITS_MLP_CONFIG, train

CONFIG = dataclasses.replace(DIGITS_MLP_CONFIG, epochs=150)
LOWER_BOUNDS = {  # well below what these measure here, far above what noise gives (≈ 0)
    "graddot": 0.1,
    "tracin": 0.1,
    "trak": 0.2,
    "influence-exact": 0.3,
    "influence-ekfac": 0.3,
    "influence-cg": 0.3,
}


def make_model(seed: int):
    return models.mlp(hidden=32, seed=seed)


@pytest.fixture(scope="module")
def problem():
    train_set, test_set = load_digits_split(n_train=300, n_test=40, seed=1)
    states = []
    for seed in range(3):
        model = make_model(seed)
        states.append(
            train(
                model, ClassificationTask, train_set, dataclasses.replace(CONFIG, seed=seed)
            ).state_dict
        )
    plan = SubsetPlan(len(train_set), alpha=0.5, n_subsets=24, seed=0)
    truth = retrain_on_subsets(
        plan, make_model, ClassificationTask, train_set, test_set, CONFIG, progress=False
    )
    return train_set, test_set, states, truth


@pytest.mark.parametrize(
    ("label", "name", "arguments"),
    [
        ("graddot", "graddot", {}),
        ("tracin", "tracin", {"proj_dim": 256}),
        ("trak", "trak", {"proj_dim": 256}),
        ("influence-exact", "influence", {"solver": "exact"}),
        ("influence-ekfac", "influence", {"solver": "ekfac"}),
        ("influence-cg", "influence", {"solver": "cg", "cg_iterations": 50}),
    ],
)
def test_lds_of_each_method(problem, label, name, arguments):
    train_set, test_set, states, truth = problem
    task = ClassificationTask(make_model(0), checkpoints=states)
    scores = build_method(name, task, **arguments).fit(train_set).score(test_set)
    result = lds(scores, truth.masks, truth.outputs)
    print(f"LDS {label}: {result.mean:.3f} (24 subsets, 300 train, 40 test)")
    assert result.mean > LOWER_BOUNDS[label]


def test_self_influence_finds_flipped_labels():
    train_set, _ = load_digits_split(n_train=300, n_test=10, seed=1)
    noisy_y, flipped = flip_labels(train_set.y, 0.1, 10, seed=0)
    model = make_model(0)
    train(model, ClassificationTask, type(train_set)(train_set.x, noisy_y), CONFIG)
    method = build_method("influence", ClassificationTask(model), solver="ekfac")
    noisy = (train_set.x, noisy_y)
    auc = mislabel_auc(self_influence(method.fit(noisy), noisy), flipped.numpy())
    print(f"mislabel AUC (EK-FAC self-influence, 10% flipped): {auc:.3f}")
    assert auc > 0.8
    assert np.isfinite(auc)
