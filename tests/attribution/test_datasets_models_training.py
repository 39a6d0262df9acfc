"""Built-in datasets, architectures and deterministic training (real training on digits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attribution.data import Examples
from attribution.datasets import flip_labels, load_digits_split
from attribution.errors import AttributionError
from attribution.models import ARCHITECTURES, build, logistic_regression, mlp, small_cnn, tiny_gpt2
from attribution.tasks import CausalLMTask, ClassificationTask
from attribution.training import (
    DIGITS_LOGREG_CONFIG,
    DIGITS_MLP_CONFIG,
    TrainConfig,
    accuracy,
    checkpoint_steps,
    default_config,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost 10–50×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- datasets ------------------------------------------------------------------------------------
def test_digits_split_is_fixed_standardised_and_typed(digits):
    train_set, test_set = digits
    assert train_set.x.shape == (1000, 64) and test_set.x.shape == (300, 64)
    assert train_set.x.dtype == torch.float32 and train_set.y.dtype == torch.int64
    assert torch.isfinite(train_set.x).all() and torch.isfinite(test_set.x).all()
    assert train_set.x.mean(0).abs().max() < 1e-5
    std = train_set.x.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))  # constant border pixels stay 0
    again_train, again_test = load_digits_split()
    assert torch.equal(again_train.x, train_set.x) and torch.equal(again_test.y, test_set.y)
    other, _ = load_digits_split(seed=1)
    assert not torch.equal(other.y, train_set.y)


def test_digits_split_rejects_impossible_sizes():
    with pytest.raises(AttributionError, match="digits has 1797 examples"):
        load_digits_split(n_train=1700, n_test=300)
    with pytest.raises(AttributionError, match="positive"):
        load_digits_split(n_train=0)


def test_flip_labels_flips_exactly_the_requested_fraction(digits):
    y = digits[0].y
    noisy, flipped = flip_labels(y, 0.1, 10, seed=3)
    assert flipped.dtype == torch.bool and int(flipped.sum()) == 100
    assert torch.all(noisy[flipped] != y[flipped]) and torch.equal(noisy[~flipped], y[~flipped])
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    again, again_mask = flip_labels(y, 0.1, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(again_mask, flipped)
    assert not torch.equal(flip_labels(y, 0.1, 10, seed=4)[1], flipped)
    assert torch.equal(y, digits[0].y)  # input untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 1.5, "num_classes": 10}, "fraction"),
        ({"fraction": 0.1, "num_classes": 1}, "at least 2 classes"),
        ({"fraction": 0.1, "num_classes": 5}, r"labels must lie in \[0, 4\]"),
    ],
)
def test_flip_labels_bad_input_names_the_problem(digits, kwargs, message):
    with pytest.raises(AttributionError, match=message):
        flip_labels(digits[0].y, seed=0, **kwargs)


# --- models --------------------------------------------------------------------------------------
def test_builders_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for name in ("mlp", "logistic_regression", "small_cnn", "tiny_gpt2"):
        a, b, c = build(name, seed=5), build(name, seed=5), build(name, seed=6)
        assert same_state(a.state_dict(), b.state_dict()), name
        assert not same_state(a.state_dict(), c.state_dict()), name
    assert torch.equal(torch.get_rng_state(), before)


def test_builders_produce_the_expected_shapes():
    x = torch.randn(3, 64)
    assert mlp()(x).shape == (3, 10)
    deep = mlp(hidden=[32, 16], num_classes=4)
    assert deep(x).shape == (3, 4) and sum(isinstance(m, torch.nn.Linear) for m in deep) == 3
    assert logistic_regression(64, 10)(x).shape == (3, 10)
    cnn = small_cnn()
    assert cnn(x).shape == (3, 10) and torch.equal(cnn(x), cnn(x.reshape(3, 1, 8, 8)))
    gpt = tiny_gpt2(vocab_size=50, n_positions=16)
    tokens = torch.randint(0, 50, (2, 12))
    assert gpt(tokens).logits.shape == (2, 12, 50)
    assert gpt.config.eos_token_id == 49 and gpt.config.resid_pdrop == 0.0


def test_build_names_unknown_architectures_and_arguments():
    assert build("small-cnn", channels=4)(torch.randn(2, 64)).shape == (2, 10)
    with pytest.raises(AttributionError, match="unknown architecture 'resnet'") as err:
        build("resnet")
    assert all(name in str(err.value) for name in ARCHITECTURES)
    with pytest.raises(AttributionError, match=r"does not take \['width'\]"):
        build("mlp", width=3)
    with pytest.raises(AttributionError, match="hidden"):
        mlp(hidden=[])


# --- training ------------------------------------------------------------------------------------
def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(100, 4) == [25, 50, 75, 100]
    assert checkpoint_steps(10, 3) == [4, 7, 10]
    assert checkpoint_steps(2, 5) == [1, 2]


def test_training_is_bitwise_deterministic_and_records_checkpoints(digits):
    data = digits[0].subset(np.arange(200))
    config = TrainConfig(epochs=6, batch_size=64, checkpoints=3, learning_rate=1e-2)
    runs = [train(mlp(seed=1), ClassificationTask, data, config) for _ in range(2)]
    assert same_state(runs[0].state_dict, runs[1].state_dict)
    assert runs[0].losses == runs[1].losses
    steps = [c.step for c in runs[0].checkpoints]
    assert steps == [8, 16, 24]  # 4 minibatches per epoch
    assert same_state(dict(runs[0].checkpoints[-1].state), runs[0].state_dict)
    assert not same_state(dict(runs[0].checkpoints[0].state), runs[0].state_dict)
    rates = [c.learning_rate for c in runs[0].checkpoints]
    assert rates[0] > rates[1] > rates[2] > 0  # cosine: mean rate of each stretch decreases
    shuffled = train(mlp(seed=1), ClassificationTask, data, dataclasses.replace(config, seed=9))
    assert not same_state(shuffled.state_dict, runs[0].state_dict)


def test_constant_schedule_records_the_learning_rate(digits):
    data = digits[0].subset(np.arange(50))
    config = TrainConfig(
        epochs=4, optimizer="sgd", momentum=0.9, schedule="constant", checkpoints=2
    )
    result = train(logistic_regression(64, 10), ClassificationTask, data, config)
    assert [(c.step, c.learning_rate) for c in result.checkpoints] == [(2, 1e-2), (4, 1e-2)]


def test_num_threads_applies_only_while_training(digits):
    data = digits[0].subset(np.arange(20))
    before = torch.get_num_threads()
    train(mlp(), ClassificationTask, data, TrainConfig(epochs=1, num_threads=before + 1))
    assert torch.get_num_threads() == before


def test_digits_mlp_reaches_95_percent(digits):
    train_set, test_set = digits
    model = mlp(seed=0)
    result = train(model, ClassificationTask, train_set, DIGITS_MLP_CONFIG)
    assert accuracy(model, test_set) >= 0.95
    assert len(result.checkpoints) == DIGITS_MLP_CONFIG.checkpoints
    assert result.losses[-1] < 0.05


def test_logistic_regression_reaches_the_stationary_point_of_the_stated_objective(digits):
    """J(θ) = mean CE + (λ/2)‖θ‖² has ∇J ≈ 0 at the trained weights."""
    data = digits[0].subset(np.arange(300))
    model = logistic_regression(64, 10, seed=2)
    train(model, ClassificationTask, data, DIGITS_LOGREG_CONFIG)
    lam = DIGITS_LOGREG_CONFIG.weight_decay
    objective = torch.nn.functional.cross_entropy(model(data.x), data.y) + lam / 2 * sum(
        (p**2).sum() for p in model.parameters()
    )
    grads = torch.autograd.grad(objective, list(model.parameters()))
    assert torch.sqrt(sum((g**2).sum() for g in grads)) < 1e-4


def test_training_a_tiny_gpt2_runs_and_lowers_the_loss():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (8, 10), generator=gen)
    config = default_config("tiny-gpt2", epochs=5, batch_size=4)
    model = tiny_gpt2(vocab_size=32, n_layer=1, n_embd=32, n_positions=16)
    result = train(model, CausalLMTask, Examples(tokens, tokens.clone()), config)
    assert result.losses[-1] < result.losses[0]
    assert [c.step for c in result.checkpoints] == [2, 4, 6, 8, 10]


def test_bad_training_input_names_the_problem(digits):
    data = digits[0].subset(np.arange(20))
    for config, message in [
        (TrainConfig(epochs=0), "epochs"),
        (TrainConfig(learning_rate=-1.0), "learning_rate"),
        (TrainConfig(batch_size=0), "batch_size"),
        (TrainConfig(optimizer="lbfgs"), "optimizer"),  # type: ignore[arg-type]
        (TrainConfig(checkpoints=0), "checkpoints"),
        (TrainConfig(schedule="step"), "schedule"),  # type: ignore[arg-type]
        (TrainConfig(num_threads=0), "num_threads"),
    ]:
        with pytest.raises(AttributionError, match=message):
            train(mlp(), ClassificationTask, data, config)
    other = ClassificationTask(mlp(seed=3))
    with pytest.raises(AttributionError, match="wraps a different model"):
        train(mlp(), other, data)
    with pytest.raises(AttributionError, match="no default training config"):
        default_config("resnet")
    with pytest.raises(AttributionError, match="no field"):
        default_config("mlp", epoch=3)
