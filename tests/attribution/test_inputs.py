"""Bad input raises an AttributionError that names the problem."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from attribution import (
    TRAK,
    AttributionError,
    ClassificationTask,
    GradientSimilarity,
    InfluenceFunction,
)


@pytest.fixture
def task(small_mlp):
    return ClassificationTask(copy.deepcopy(small_mlp))


def test_inputs_of_the_wrong_shape(task, digits_small):
    (x, y), _ = digits_small
    with pytest.raises(AttributionError, match="shape"):
        GradientSimilarity(task).fit((x[:, :10], y))


def test_mismatched_lengths(task, digits_small):
    (x, y), _ = digits_small
    with pytest.raises(AttributionError, match="300 inputs but 299 targets"):
        GradientSimilarity(task).fit((x, y[:-1]))


def test_nan_inputs(task, digits_small):
    (x, y), _ = digits_small
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(AttributionError, match="NaN"):
        TRAK(task, proj_dim=16).fit((bad, y))


def test_empty_train_set(task, digits_small):
    (x, y), _ = digits_small
    with pytest.raises(AttributionError, match="empty"):
        GradientSimilarity(task).fit((x[:0], y[:0]))


def test_labels_out_of_range(task, digits_small):
    (x, y), _ = digits_small
    with pytest.raises(AttributionError, match=r"class labels must lie in \[0, 4\]"):
        GradientSimilarity(task).fit((x, y + 7))


def test_checkpoint_that_does_not_fit_the_architecture(small_mlp):
    other = nn.Sequential(nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 5))
    with pytest.raises(AttributionError, match="does not fit the architecture: .*shape mismatches"):
        ClassificationTask(copy.deepcopy(small_mlp), checkpoints=[other.state_dict()])


def test_checkpoint_file_that_does_not_fit(small_mlp, tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(AttributionError, match="missing keys"):
        ClassificationTask(copy.deepcopy(small_mlp), checkpoints=[path])


def test_pickle_checkpoints_are_refused(small_mlp, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_mlp.state_dict(), path)
    with pytest.raises(AttributionError, match="not a .safetensors file"):
        ClassificationTask(copy.deepcopy(small_mlp), checkpoints=[path])


def test_corrupt_safetensors(small_mlp, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AttributionError, match="not a readable safetensors file"):
        ClassificationTask(copy.deepcopy(small_mlp), checkpoints=[path])


def test_nan_weights(small_mlp):
    state = {k: v.clone() for k, v in small_mlp.state_dict().items()}
    state["0.weight"][0, 0] = float("nan")
    with pytest.raises(AttributionError, match="NaN or infinite values in 0.weight"):
        ClassificationTask(copy.deepcopy(small_mlp), checkpoints=[state])


def test_learning_rates_must_match_checkpoints(small_mlp):
    with pytest.raises(AttributionError, match="2 learning rates for 1 checkpoints"):
        ClassificationTask(
            copy.deepcopy(small_mlp),
            checkpoints=[small_mlp.state_dict()],
            learning_rates=[0.1, 0.2],
        )


def test_unknown_knobs_and_bad_values(task):
    with pytest.raises(AttributionError, match="unexpected keyword"):
        TRAK(task, proj_dims=5)
    with pytest.raises(AttributionError, match="solver must be one of"):
        InfluenceFunction(task, solver="newton")
    with pytest.raises(AttributionError, match="checkpoints"):
        TRAK(task, checkpoints=[3])


def test_queries_before_fit(task, digits_small):
    _, test = digits_small
    with pytest.raises(AttributionError, match="not fitted"):
        TRAK(task, proj_dim=16).score(test)
    with pytest.raises(AttributionError, match="needs fit"):
        InfluenceFunction(task, solver="cg").query_vectors(test)
