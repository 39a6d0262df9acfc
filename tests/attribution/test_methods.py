"""Every method against an exact or brute-force reference on models small enough to check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from attribution import (
    TRAK,
    AttributionError,
    ClassificationTask,
    GradientSimilarity,
    InfluenceFunction,
    TracIn,
    build_method,
    self_influence,
    value,
)
from attribution.gradients import per_example_gradients


def closed_form_influence(model: nn.Linear, train, test, weight_decay: float) -> np.ndarray:
    """Influence of multinomial logistic regression written out with numpy.

    H = (1/n) Σ (diag p − ppᵀ) ⊗ x xᵀ + λI, ∇L_i = (p_i − e_y) ⊗ x_i, ∇f = (∂f/∂z) ⊗ x, and
    score(t, i) = ∇f_tᵀ H⁻¹ (−∇L_i) / n.
    """
    w = model.weight.detach().double().numpy()
    (x, y), (xt, yt) = (
        (train[0].double().numpy(), train[1].numpy()),
        (test[0].double().numpy(), test[1].numpy()),
    )
    n, classes = len(x), w.shape[0]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p = softmax(x @ w.T)
    hessian = (
        sum(
            np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(xi, xi))
            for pi, xi in zip(p, x, strict=True)
        )
        / n
    )
    hessian += weight_decay * np.eye(hessian.shape[0])
    grad_loss = np.stack(
        [np.kron(pi - np.eye(classes)[yi], xi) for pi, yi, xi in zip(p, y, x, strict=True)]
    )
    zt = xt @ w.T
    grad_f = []
    for z, label, xi in zip(zt, yt, xt, strict=True):
        others = np.delete(np.arange(classes), label)
        dz = np.zeros(classes)
        dz[label] = 1.0
        dz[others] = -softmax(z[others][None])[0]
        grad_f.append(np.kron(dz, xi))
    return np.stack(grad_f) @ np.linalg.solve(hessian, -grad_loss.T) / n


@pytest.mark.parametrize("hessian", ["ggn", "full"])
def test_exact_influence_equals_closed_form_logistic_regression(logreg, digits_small, hessian):
    train, test = digits_small
    task = ClassificationTask(copy.deepcopy(logreg))
    method = InfluenceFunction(task, solver="exact", damping=1e-2, hessian=hessian).fit(train)
    expected = closed_form_influence(logreg, train, test, 1e-2)
    got = method.score(test)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())


def test_exact_influence_predicts_leave_one_out_retraining(logreg, digits_small, fit):
    """Ground truth by retraining: the first-order prediction tracks the actual LOO change."""
    train, test = digits_small
    task = ClassificationTask(copy.deepcopy(logreg))
    scores = InfluenceFunction(task, solver="exact", damping=1e-2).fit(train).score(test)
    margin = ClassificationTask(logreg).output
    base = margin(logreg(test[0]), test[1]).detach().numpy()
    removed = [int(i) for i in np.argsort(-np.abs(scores).sum(0))[:8]]
    predicted, actual = [], []
    for i in removed:
        keep = torch.ones(len(train[0]), dtype=torch.bool)
        keep[i] = False
        model = copy.deepcopy(logreg)
        fit(model, train[0][keep], train[1][keep], weight_decay=1e-2)
        actual.append(base - margin(model(test[0]), test[1]).detach().numpy())
        predicted.append(scores[:, i])
    corr = np.corrcoef(np.concatenate(predicted), np.concatenate(actual))[0, 1]
    print(f"exact influence vs leave-one-out retraining: Pearson r = {corr:.3f}")
    assert corr > 0.95


def test_cg_and_lissa_match_exact(logreg, digits_small):
    train, test = digits_small
    exact = InfluenceFunction(
        ClassificationTask(copy.deepcopy(logreg)), solver="exact", damping=1e-2
    ).fit(train)
    cg = InfluenceFunction(
        ClassificationTask(copy.deepcopy(logreg)), solver="cg", damping=1e-2
    ).fit(train)
    lissa = InfluenceFunction(
        ClassificationTask(copy.deepcopy(logreg)),
        solver="lissa",
        damping=1e-2,
        lissa_depth=150,
        lissa_batch_size=300,
    ).fit(train)
    reference = exact.score((test[0][:10], test[1][:10]))
    np.testing.assert_allclose(
        cg.score((test[0][:10], test[1][:10])),
        reference,
        rtol=1e-3,
        atol=1e-4 * np.abs(reference).max(),
    )
    approx = lissa.score((test[0][:10], test[1][:10]))
    corr = np.corrcoef(approx.ravel(), reference.ravel())[0, 1]
    print(f"LiSSA vs exact: Pearson r = {corr:.4f}")
    assert corr > 0.95


def test_ekfac_tracks_exact_influence(small_mlp, digits_small):
    """Same damping: EK-FAC's block-diagonal Fisher approximates the exact GGN inverse."""
    train, test = digits_small
    exact = InfluenceFunction(
        ClassificationTask(copy.deepcopy(small_mlp)), solver="exact", damping=1e-2
    )
    ekfac = InfluenceFunction(
        ClassificationTask(copy.deepcopy(small_mlp)), solver="ekfac", damping=1e-2
    )
    a, b = exact.fit(train).score(test), ekfac.fit(train).score(test)
    corr = np.mean([np.corrcoef(a[j], b[j])[0, 1] for j in range(len(a))])
    print(f"EK-FAC vs exact GGN influence: mean per-test Pearson r = {corr:.3f}")
    assert corr > 0.8


def _trajectory(digits_small, lrs=(0.5, 0.3, 0.1)):
    """Three SGD checkpoints of an MLP and their learning rates."""
    (x, y), _ = digits_small
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(x.shape[1], 16), nn.ReLU(), nn.Linear(16, 5))
    states = []
    for lr in lrs:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states, list(lrs)


def test_tracin_one_checkpoint_is_lr_times_graddot(digits_small):
    train, test = digits_small
    model, states, lrs = _trajectory(digits_small)
    task = ClassificationTask(model, checkpoints=states, learning_rates=lrs)
    tracin = TracIn(task, checkpoints=[1]).fit(train).score(test)
    graddot = GradientSimilarity(task, checkpoints=[1]).fit(train).score(test)
    np.testing.assert_allclose(
        tracin, lrs[1] * graddot, rtol=1e-4, atol=1e-6 * np.abs(graddot).max()
    )
    # and all checkpoints: Σ_c η_c ⟨g_c(test), g_c(train)⟩ by brute force
    full = TracIn(task).fit(train).score(test)
    brute = 0
    for c, lr in enumerate(lrs):
        task.load_checkpoint(c)
        q = per_example_gradients(task, test[0], test[1], "output")
        t = per_example_gradients(task, train[0], train[1], "loss")
        brute = brute + lr * (q @ t.T).numpy()
    np.testing.assert_allclose(full, brute, rtol=1e-4, atol=1e-6 * np.abs(brute).max())


def test_projected_tracin_approaches_exact(digits_small):
    train, test = digits_small
    model, states, lrs = _trajectory(digits_small)
    task = ClassificationTask(model, checkpoints=states, learning_rates=lrs)
    exact = TracIn(task).fit(train).score(test)
    errors = []
    for dim in (32, 256, 2048):
        approx = TracIn(task, proj_dim=dim).fit(train).score(test)
        errors.append(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
    print("projected TracIn relative error by proj_dim 32/256/2048:", np.round(errors, 3))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


METHOD_CONFIGS = [
    ("graddot", {}),
    ("gradcos", {}),
    ("tracin", {"proj_dim": 64}),
    ("trak", {"proj_dim": 64}),
    ("trak", {"proj_dim": 64, "gradient": "factored"}),
    ("influence", {"solver": "exact"}),
    ("influence", {"solver": "ekfac"}),
    ("influence", {"solver": "ekfac", "proj_dim": 128}),
    ("influence", {"solver": "cg"}),
]


@pytest.mark.parametrize(("name", "arguments"), METHOD_CONFIGS)
def test_score_is_inner_product_of_query_and_train_vectors(
    small_mlp, digits_small, name, arguments
):
    train, test = digits_small
    method = build_method(name, ClassificationTask(copy.deepcopy(small_mlp)), **arguments).fit(
        train
    )
    scores = method.score(test)
    assert scores.shape == (len(test[0]), len(train[0]))
    np.testing.assert_allclose(
        scores, method.query_vectors(test) @ method.train_vectors().T, rtol=1e-5, atol=1e-7
    )
    assert np.isfinite(scores).all()


def test_float16_storage_keeps_scores(small_mlp, digits_small):
    train, test = digits_small
    full = TRAK(ClassificationTask(copy.deepcopy(small_mlp)), proj_dim=64).fit(train)
    half = TRAK(
        ClassificationTask(copy.deepcopy(small_mlp)), proj_dim=64, storage_dtype="float16"
    ).fit(train)
    assert half.stored_train.dtype == np.float16 and half.train_vectors().dtype == np.float32
    peak = np.abs(full.train_vectors()).max()
    assert peak < 1e-3  # TRAK's vectors sit far below float16's normal range (6e-5) ...
    assert 16 <= np.abs(half.stored_train).max() < 32  # ... so they are stored scaled by 2^e
    np.testing.assert_allclose(half.train_vectors(), full.train_vectors(), atol=2e-3 * peak)
    a, b = full.score(test), half.score(test)
    assert np.abs(a - b).max() < 2e-3 * np.abs(a).max()


@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_influence_state_round_trip(small_mlp, digits_small, solver):
    """A restored state answers queries and featurizes new rows exactly like the fitted one."""
    train, test = digits_small
    task = ClassificationTask(copy.deepcopy(small_mlp))
    fitted = InfluenceFunction(task, solver=solver, proj_dim=32).fit(train)
    restored = InfluenceFunction(task, solver=solver, proj_dim=32)
    restored.load_state_dict(fitted.state_dict())
    assert restored.n_train == len(train[0]) and restored.dampings == fitted.dampings
    np.testing.assert_allclose(restored.query_vectors(test), fitted.query_vectors(test), rtol=1e-6)
    rows = restored._examples((train[0][:20], train[1][:20]), "train")
    np.testing.assert_allclose(
        restored.transform_train(restored.featurize_train(rows)),
        fitted.train_vectors()[:20], rtol=1e-4, atol=1e-7 * np.abs(fitted.train_vectors()).max(),
    )
    with pytest.raises(AttributionError, match="missing"):
        InfluenceFunction(task, solver=solver, proj_dim=32).load_state_dict({"n_train": 1})
    with pytest.raises(AttributionError, match="needs the train set"):
        InfluenceFunction(task, solver="cg").load_state_dict(fitted.state_dict())


def test_concurrent_queries_match_sequential(digits_small):
    """Threads querying one multi-checkpoint method do not see each other's checkpoint swaps."""
    from concurrent.futures import ThreadPoolExecutor

    train, test = digits_small
    model, states, lrs = _trajectory(digits_small)
    method = TRAK(ClassificationTask(model, checkpoints=states, learning_rates=lrs), proj_dim=32)
    method.fit(train)
    batches = [(test[0][i::4], test[1][i::4]) for i in range(4)]
    expected = [method.query_vectors(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(method.query_vectors, batches))
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)


def test_same_seed_same_scores_other_seed_other_projection(digits_small):
    train, test = digits_small
    model, states, lrs = _trajectory(digits_small)
    task = ClassificationTask(model, checkpoints=states, learning_rates=lrs)
    first = TRAK(task, proj_dim=64, seed=3).fit(train).score(test)
    again = TRAK(task, proj_dim=64, seed=3).fit(train).score(test)
    other = TRAK(task, proj_dim=64, seed=4).fit(train).score(test)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    method = TRAK(task, proj_dim=64)
    matrices = [method.featurizer(c).projector.matrix() for c in range(3)]
    assert not torch.equal(matrices[0], matrices[1]) and not torch.equal(matrices[1], matrices[2])


def test_trak_staged_fit_over_shards_equals_fit(small_mlp, digits_small):
    """What the indexer does: featurize shards, observe, finalize, transform; state round-trips."""
    train, test = digits_small
    task = ClassificationTask(copy.deepcopy(small_mlp))
    whole = TRAK(task, proj_dim=64).fit(train)
    staged = TRAK(task, proj_dim=64)
    shards = [(train[0][i : i + 100], train[1][i : i + 100]) for i in range(0, 300, 100)]
    raws = [staged.featurize_train(staged._examples(s, "train")) for s in shards]
    for raw in raws:
        staged.observe(raw)
    staged.finalize_state()
    vectors = np.concatenate([staged.transform_train(raw) for raw in raws])
    np.testing.assert_allclose(vectors, whole.train_vectors(), rtol=1e-4, atol=1e-6)
    restored = TRAK(task, proj_dim=64)
    restored.load_state_dict(whole.state_dict())
    np.testing.assert_allclose(restored.transform_train(raws[0]), vectors[:100], rtol=1e-6)
    np.testing.assert_allclose(restored.query_vectors(test), whole.query_vectors(test))


def test_self_influence_and_value(small_mlp, digits_small):
    train, test = digits_small
    method = GradientSimilarity(ClassificationTask(copy.deepcopy(small_mlp))).fit(train)
    scores = self_influence(method, train)
    task = method.task
    grads = per_example_gradients(task, train[0], train[1], "loss").numpy()
    np.testing.assert_allclose(scores, (grads**2).sum(1), rtol=1e-4)
    values = value(method, test)
    queries = per_example_gradients(task, test[0], test[1], "loss").numpy()
    np.testing.assert_allclose(
        values, grads @ queries.sum(0), rtol=1e-3, atol=1e-5 * np.abs(values).max()
    )


def test_regression_influence_equals_closed_form_least_squares():
    """Ridge regression: score(t, i) = x_tᵀ (XᵀX/n + λI)⁻¹ x_i (y_i − ŷ_i) / n."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=generator)
    y = x @ torch.randn(6, generator=generator) + 0.1 * torch.randn(80, generator=generator)
    model = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    from attribution import RegressionTask

    method = InfluenceFunction(RegressionTask(model), solver="exact", damping=0.1).fit((x, y))
    xt = torch.randn(5, 6, generator=generator)
    got = method.score((xt, torch.zeros(5)))
    xd, yd, td = x.double().numpy(), y.double().numpy(), xt.double().numpy()
    residual = yd - xd @ model.weight.detach().double().numpy()[0]
    hessian = xd.T @ xd / 80 + 0.1 * np.eye(6)
    expected = td @ np.linalg.solve(hessian, (xd * residual[:, None]).T) / 80
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


def test_lissa_scores_are_inner_products(small_mlp, digits_small):
    train, test = digits_small
    method = InfluenceFunction(
        ClassificationTask(copy.deepcopy(small_mlp)), solver="lissa", lissa_depth=5
    )
    method.fit(train)
    assert not method.indexable and method.query_needs_state
    few = (test[0][:4], test[1][:4])
    np.testing.assert_allclose(
        method.score(few),
        method.query_vectors(few) @ method.train_vectors().T,
        rtol=1e-5,
        atol=1e-7,
    )
