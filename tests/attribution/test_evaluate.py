"""LDS, LOO correlation, mislabel AUC and the shareable subset-retraining machinery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call, grad, jacrev, vmap

from attribution.datasets import load_digits_split
from attribution.errors import AttributionError
from attribution.evaluate import (
    SubsetOutcome,
    SubsetPlan,
    SubsetResults,
    lds,
    leave_one_out,
    loo_correlation,
    mislabel_auc,
    retrain_on_subsets,
    retrain_subset,
)
from attribution.models import logistic_regression, mlp
from attribution.tasks import ClassificationTask
from attribution.training import DIGITS_LOGREG_CONFIG, TrainConfig, train

FAST = TrainConfig(epochs=200, learning_rate=0.3, weight_decay=1e-2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost 10–50×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_logreg(seed: int) -> torch.nn.Module:
    return logistic_regression(64, 10, seed=seed)


@pytest.fixture(scope="module")
def small_digits():
    train_set, test_set = load_digits_split(n_train=120, n_test=40, seed=1)
    return train_set, test_set


# --- subset plans --------------------------------------------------------------------------------
def test_plan_masks_are_exact_deterministic_and_independent_of_other_subsets():
    plan = SubsetPlan(n_train=50, alpha=0.3, n_subsets=10, seed=4)
    masks = plan.masks()
    assert masks.shape == (10, 50) and masks.dtype == bool
    assert (masks.sum(1) == 15).all()
    assert np.array_equal(masks, SubsetPlan(50, 0.3, 10, 4).masks())
    bigger = SubsetPlan(50, 0.3, 100, 4)
    assert np.array_equal(bigger.mask(7), masks[7])  # adding subsets keeps the earlier ones
    assert len({m.tobytes() for m in masks}) == 10
    assert not np.array_equal(SubsetPlan(50, 0.3, 10, 5).mask(0), masks[0])
    assert plan.model_seed(3, 0) == plan.model_seed(3, 0) != plan.model_seed(3, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 1}, "n_train"),
        ({"n_train": 10, "alpha": 0.0}, "alpha"),
        ({"n_train": 10, "alpha": 0.01}, "empty subset"),
        ({"n_train": 10, "n_subsets": 0}, "n_subsets"),
    ],
)
def test_plan_rejects_bad_parameters(kwargs, message):
    with pytest.raises(AttributionError, match=message):
        SubsetPlan(**kwargs)


def test_plan_rejects_out_of_range_subset():
    with pytest.raises(AttributionError, match="k=5 is outside"):
        SubsetPlan(10, n_subsets=5).mask(5)


# --- LDS -----------------------------------------------------------------------------------------
def test_lds_matches_a_brute_force_spearman_computation():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 30))
    masks = rng.random((25, 30)) < 0.5
    outputs = rng.normal(size=(25, 7)) + (masks @ scores.T) * 0.3
    outputs[:, 3] = 1.5  # a constant column: Spearman is undefined there
    per_test = []
    for j in range(7):
        predicted = [scores[j, masks[k]].sum() for k in range(25)]
        per_test.append(np.nan if j == 3 else spearmanr(predicted, outputs[:, j]).statistic)
    result = lds(scores, masks, outputs)
    np.testing.assert_allclose(result.per_test, per_test, atol=1e-12)
    assert result.n_undefined == 1 and np.isnan(result.per_test[3])
    assert result.mean == pytest.approx(np.nanmean(per_test), abs=1e-12)
    # 0/1 integer masks and torch inputs are accepted too
    again = lds(torch.from_numpy(scores), masks.astype(int), outputs)
    assert again.mean == pytest.approx(result.mean, abs=1e-12)


def test_lds_is_one_for_the_exact_linear_datamodel():
    """Ground truth f_j(S) = b_j + Σ_{i∈S} w_ji: its own weights score LDS = 1."""
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(20, 200))
    masks = SubsetPlan(200, 0.5, 60, seed=0).masks()
    outputs = rng.normal(size=20) + masks @ weights.T
    assert lds(weights, masks, outputs).mean == pytest.approx(1.0, abs=1e-12)
    noisy = outputs + rng.normal(scale=0.05, size=outputs.shape)
    assert lds(weights, masks, noisy).mean > 0.99
    assert lds(-weights, masks, outputs).mean == pytest.approx(-1.0, abs=1e-12)
    assert abs(lds(rng.normal(size=weights.shape), masks, outputs).mean) < 0.2


@pytest.mark.parametrize(
    ("scores", "masks", "outputs", "message"),
    [
        (np.zeros(5), np.ones((4, 5), bool), np.zeros((4, 1)), "scores must be 2-D"),
        (np.zeros((2, 5)), np.ones((4, 6), bool), np.zeros((4, 2)), "masks cover 6"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((3, 2)), "4 subset masks but 3 rows"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((4, 3)), "outputs for 3"),
        (np.full((2, 5), np.nan), np.ones((4, 5), bool), np.zeros((4, 2)), "scores contains NaN"),
        (np.zeros((2, 5)), np.full((4, 5), 2.0), np.zeros((4, 2)), "masks must be boolean"),
        (np.zeros((2, 5)), np.ones((2, 5), bool), np.zeros((2, 2)), "at least 3 subsets"),
    ],
)
def test_lds_bad_input_names_the_problem(scores, masks, outputs, message):
    with pytest.raises(AttributionError, match=message):
        lds(scores, masks, outputs)


# --- retraining ----------------------------------------------------------------------------------
def test_retraining_is_deterministic_and_splits_into_independent_units(small_digits, tmp_path):
    train_set, test_set = small_digits
    plan = SubsetPlan(len(train_set), alpha=0.5, n_subsets=3, seed=2)
    results = retrain_on_subsets(
        plan, make_logreg, ClassificationTask, train_set, test_set, FAST, progress=False
    )
    assert results.masks.shape == (3, 120) and results.outputs.shape == (3, 40)
    assert np.array_equal(results.masks, plan.masks())
    # one worker per subset, in any order, gives the same stacked result
    units = [
        retrain_subset(plan, k, make_logreg, ClassificationTask, train_set, test_set, FAST)
        for k in (2, 0, 1)
    ]
    stacked = SubsetResults.from_outcomes(units)
    assert np.array_equal(stacked.subset_ids, [0, 1, 2])
    assert np.array_equal(stacked.outputs, results.outputs)
    assert np.array_equal(stacked.losses, results.losses)
    assert np.all(results.losses > 0)
    # the margin of a correctly classified example is positive
    assert (results.outputs > 0).mean() > 0.7

    path = results.save(tmp_path / "subsets.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["subsets.npz"]  # no temporary file left
    loaded = SubsetResults.load(path)
    assert np.array_equal(loaded.masks, results.masks)
    assert np.array_equal(loaded.outputs, results.outputs)
    assert loaded.meta["plan"] == plan.to_dict() and loaded.meta["config"]["epochs"] == 200


def test_seed_averaging_differs_from_a_single_seed(small_digits):
    train_set, test_set = small_digits
    plan = SubsetPlan(len(train_set), n_subsets=1)
    mlp_config = TrainConfig(epochs=30, learning_rate=1e-2)

    def make(seed: int) -> torch.nn.Module:
        return mlp(hidden=16, seed=seed)

    one = retrain_subset(plan, 0, make, ClassificationTask, train_set, test_set, mlp_config)
    two = retrain_subset(plan, 0, make, ClassificationTask, train_set, test_set, mlp_config, 2)
    assert not np.allclose(one.outputs, two.outputs)


def test_subset_results_bad_input_names_the_problem(tmp_path, small_digits):
    outcome = SubsetOutcome(0, np.ones(4, bool), np.zeros(3), np.zeros(3))
    with pytest.raises(AttributionError, match="duplicate subset ids"):
        SubsetResults.from_outcomes([outcome, outcome])
    with pytest.raises(AttributionError, match="no subset outcomes"):
        SubsetResults.from_outcomes([])
    with pytest.raises(AttributionError, match="2 masks but 1 output rows"):
        SubsetResults(np.ones((2, 4), bool), np.zeros((1, 3)), np.zeros((1, 3)), np.arange(2))
    with pytest.raises(AttributionError, match="does not exist"):
        SubsetResults.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(AttributionError, match="not a readable"):
        SubsetResults.load(tmp_path / "junk.npz")
    train_set, test_set = small_digits
    with pytest.raises(AttributionError, match="plan is for 50 training examples"):
        retrain_subset(SubsetPlan(50), 0, make_logreg, ClassificationTask, train_set, test_set)
    with pytest.raises(AttributionError, match="Task class or factory"):
        retrain_subset(
            SubsetPlan(120), 0, make_logreg, ClassificationTask(make_logreg(0)), train_set, test_set
        )


def influence_scores(model, train_set, test_set, weight_decay: float) -> np.ndarray:
    """Closed-form influence of L2-regularised logistic regression (independent of the engine):
    effect of including i on f_j ∝ −∇f_jᵀ H⁻¹ ∇L_i, with H = ∇²(mean L + (λ/2)‖θ‖²)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model = model.double()

    def logits(flat, x):
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return functional_call(model, params, (x,))

    task = ClassificationTask
    x_train, y_train = train_set.x.double(), train_set.y

    def objective(flat):
        loss = task.loss(task, logits(flat, x_train), y_train).mean()
        return loss + weight_decay / 2 * (flat**2).sum()

    def margin(flat, x, y):
        return task.output(task, logits(flat, x[None]), y[None])[0]

    def loss(flat, x, y):
        return task.loss(task, logits(flat, x[None]), y[None])[0]

    h = jacrev(grad(objective))(theta)
    g_test = vmap(grad(margin), in_dims=(None, 0, 0))(theta, test_set.x.double(), test_set.y)
    g_train = vmap(grad(loss), in_dims=(None, 0, 0))(theta, x_train, y_train)
    return -(g_test @ torch.linalg.solve(h, g_train.T)).numpy()


def test_lds_of_exact_influence_is_high_on_real_retraining(small_digits):
    """End to end: plan → retrain → LDS of an independent closed-form influence."""
    train_set, test_set = small_digits
    model = make_logreg(0)
    train(model, ClassificationTask, train_set, FAST)
    scores = influence_scores(model, train_set, test_set, FAST.weight_decay)
    plan = SubsetPlan(len(train_set), alpha=0.5, n_subsets=12, seed=0)
    results = retrain_on_subsets(
        plan, make_logreg, ClassificationTask, train_set, test_set, FAST, progress=False
    )
    assert lds(scores, results.masks, results.outputs).mean > 0.6
    assert lds(-scores, results.masks, results.outputs).mean < -0.6


# --- leave-one-out -------------------------------------------------------------------------------
def test_leave_one_out_agrees_with_influence_for_a_convex_model(small_digits):
    train_set, test_set = small_digits
    config = DIGITS_LOGREG_CONFIG
    indices = [3, 17, 40, 65, 99]
    result = leave_one_out(
        make_logreg, ClassificationTask, train_set, test_set, indices, config, progress=False
    )
    assert result.deltas.shape == (40, 5) and result.base_outputs.shape == (40,)
    model = make_logreg(config.seed)
    train(model, ClassificationTask, train_set, config)
    scores = influence_scores(model, train_set, test_set, config.weight_decay)
    correlation = loo_correlation(scores, indices, result.deltas)
    assert correlation > 0.9
    brute = np.nanmean(
        [pearsonr(scores[j, indices], result.deltas[j]).statistic for j in range(40)]
    )
    assert correlation == pytest.approx(brute, abs=1e-9)
    spearman = loo_correlation(scores, indices, result.deltas, kind="spearman")
    assert -1 <= spearman <= 1


def test_loo_bad_input_names_the_problem(small_digits):
    train_set, test_set = small_digits
    with pytest.raises(AttributionError, match="duplicates"):
        leave_one_out(make_logreg, ClassificationTask, train_set, test_set, [1, 1])
    with pytest.raises(AttributionError, match=r"indices must lie in \[0, 119\]"):
        leave_one_out(make_logreg, ClassificationTask, train_set, test_set, [120])
    scores = np.zeros((4, 10))
    with pytest.raises(AttributionError, match="at least 3 removed"):
        loo_correlation(scores, [1, 2], np.zeros((4, 2)))
    with pytest.raises(AttributionError, match=r"shape \(n_test, len\(indices\)\) = \(4, 3\)"):
        loo_correlation(scores, [1, 2, 3], np.zeros((3, 4)))
    with pytest.raises(AttributionError, match="kind"):
        loo_correlation(scores, [1, 2, 3], np.zeros((4, 3)), kind="kendall")  # type: ignore[arg-type]


# --- mislabel detection --------------------------------------------------------------------------
def test_mislabel_auc_on_a_planted_case():
    rng = np.random.default_rng(0)
    flipped = np.zeros(100, bool)
    flipped[rng.choice(100, 10, replace=False)] = True
    clean_scores = rng.normal(size=100)
    assert mislabel_auc(clean_scores + 10 * flipped, flipped) == 1.0
    assert mislabel_auc(clean_scores - 10 * flipped, flipped) == 0.0
    assert mislabel_auc(torch.from_numpy(clean_scores + 10 * flipped), flipped.astype(int)) == 1.0
    partial = clean_scores + 1.0 * flipped
    ranks = partial[flipped][:, None] > partial[~flipped][None, :]
    assert mislabel_auc(partial, flipped) == pytest.approx(ranks.mean())


@pytest.mark.parametrize(
    ("scores", "flipped", "message"),
    [
        (np.zeros((3, 2)), np.zeros(6, bool), "self_influence must be 1-D"),
        (np.zeros(5), np.array([1, 0, 1], bool), "5 values but flipped has 3"),
        (np.array([0.0, np.nan, 1.0]), np.array([1, 0, 1], bool), "NaN"),
        (np.zeros(3), np.array([2, 0, 1]), "boolean or 0/1"),
        (np.zeros(3), np.zeros(3, bool), "both classes"),
    ],
)
def test_mislabel_auc_bad_input_names_the_problem(scores, flipped, message):
    with pytest.raises(AttributionError, match=message):
        mislabel_auc(scores, flipped)
