"""Per-example gradients and projections against materialised references."""

from __future__ import annotations

import copy

import numpy as np
import torch

from attribution import (
    TRAK,
    CausalLMTask,
    ClassificationTask,
    GradientSimilarity,
    InfluenceFunction,
)
from attribution.gradients import FactoredFeaturizer, per_example_gradients
from attribution.projectors import DenseProjector


def test_per_example_gradients_match_one_at_a_time_autograd(small_mlp, digits_small):
    (x, y), _ = digits_small
    task = ClassificationTask(copy.deepcopy(small_mlp))
    batch = per_example_gradients(task, x[:5], y[:5], "loss")
    for i in range(5):
        task.model.zero_grad()
        (-task.loss(task.model(x[i : i + 1]), y[i : i + 1]).sum()).backward()
        reference = torch.cat([p.grad.reshape(-1) for p in task.model.parameters()])
        torch.testing.assert_close(batch[i], reference, rtol=1e-4, atol=1e-6)


def test_factored_projection_equals_dense_kronecker_projection(small_mlp, digits_small):
    """Σ_t (P_out δ_t)(P_in a_t)ᵀ == (P_out ⊗ P_in) vec([∇W | ∇b]) per layer, per example."""
    (x, y), _ = digits_small
    task = ClassificationTask(copy.deepcopy(small_mlp))
    featurizer = FactoredFeaturizer(task, proj_dim=128, seed=7)
    factored, _ = featurizer(x[:6], y[:6], "output")
    assert [layer.name for layer in featurizer.capture.layers] == ["0", "2"]
    grads = per_example_gradients(task, x[:6], y[:6], "output")
    params = dict(task.model.named_parameters())
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    expected = []
    for layer, projector in zip(featurizer.capture.layers, featurizer.projectors, strict=True):
        w0, w1 = offsets[f"{layer.name}.weight"]
        b0, b1 = offsets[f"{layer.name}.bias"]
        weight = grads[:, w0:w1].reshape(6, layer.d_out, layer.d_in - 1)
        full = torch.cat([weight, grads[:, b0:b1].unsqueeze(2)], dim=2).reshape(6, -1)
        expected.append(full @ projector.dense_equivalent())
    torch.testing.assert_close(factored, torch.cat(expected, dim=1), rtol=1e-4, atol=1e-5)


def test_dense_projector_is_deterministic_blockwise_and_preserves_norms():
    cached = DenseProjector(20_000, 256, seed=3)
    streamed = DenseProjector(20_000, 256, seed=3, max_cached_bytes=0)
    g = torch.randn(4, 20_000)
    torch.testing.assert_close(cached.project(g), streamed.project(g), rtol=1e-4, atol=1e-3)
    ratio = cached.project(g).norm(dim=1) / g.norm(dim=1)
    assert torch.all((ratio > 0.8) & (ratio < 1.2))
    assert not torch.equal(
        DenseProjector(100, 16, seed=4).matrix(), DenseProjector(100, 16, seed=3).matrix()
    )


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _token_data(n: int, length: int = 12, prompt: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = -100  # score only the continuation
    return ids, labels


def test_causal_lm_path_runs_on_tiny_gpt2():
    model = _tiny_gpt2()
    task = CausalLMTask(model)
    train, test = _token_data(24), _token_data(3, seed=1)
    # f is the summed log-probability of the labelled tokens
    logits = task.forward(test[0])
    logp = logits[:, :-1].log_softmax(-1).gather(-1, test[0][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(task.output(logits, test[1]), logp[:, 3:].sum(1))
    for method in (
        TRAK(task, proj_dim=256, gradient="factored"),
        GradientSimilarity(task, proj_dim=256, gradient="factored"),
        InfluenceFunction(task, solver="ekfac", proj_dim=256),
    ):
        scores = method.fit(train).score(test)
        assert scores.shape == (3, 24) and np.isfinite(scores).all()
        np.testing.assert_allclose(
            scores, method.query_vectors(test) @ method.train_vectors().T, rtol=1e-5, atol=1e-6
        )


def test_causal_lm_factored_features_match_dense_on_a_continuation():
    """On GPT-2 the hooked per-layer gradients equal autograd's for the same example."""
    model = _tiny_gpt2()
    task = CausalLMTask(model)
    ids, labels = _token_data(2)
    featurizer = FactoredFeaturizer(task, proj_dim=64, seed=1)
    featurizer(ids, labels, "output")
    assert "transformer.wpe" not in [layer.name for layer in featurizer.capture.layers]
    layer = featurizer.capture.layers[1]  # a Conv1D (attention c_attn) of block 0
    _, captured = featurizer.capture.run(task, ids[:1], lambda out: task.output(out, labels[:1]))
    acts, deltas = captured[1]
    hooked = torch.einsum("bto,bti->boi", deltas, acts)[0]
    task.model.zero_grad()
    task.output(task.forward(ids[:1]), labels[:1]).sum().backward()
    module = layer.module
    reference = torch.cat([module.weight.grad.T, module.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(hooked, reference, rtol=1e-4, atol=1e-5)
