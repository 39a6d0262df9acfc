"""Hugging Face sequence classifiers with a pad token: vmap cannot trace them, scores still exact.

GPT2ForSequenceClassification pools the logits of the last non-pad token, found with
data-dependent ops (and a padding check calling ``.item()``) that ``torch.func.vmap`` refuses.
The dense path then differentiates one example at a time; the factored path hooks as usual.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution import TRAK, ClassificationTask, GradientSimilarity
from attribution.errors import AttributionError

PAD = 0
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gpt2_classifier(pad_token_id: int | None = PAD, seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-2 classifier built from a config (nothing is downloaded)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3,
        pad_token_id=pad_token_id, bos_token_id=31, eos_token_id=31,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2ForSequenceClassification(config).eval()


def padded_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded token ids of lengths 3..8 (real tokens never equal PAD) and labels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=generator).tolist()
    x = torch.full((n, 8), PAD)
    for i, length in enumerate(lengths):
        x[i, :length] = torch.randint(1, 31, (length,), generator=generator)
    return x, torch.randint(0, 3, (n,), generator=generator), lengths


def autograd_rows(task: ClassificationTask, x, y, lengths, measurement: str) -> torch.Tensor:
    """One backward per example on its *unpadded* tokens: the reference gradients (n, p)."""
    rows = []
    for i, length in enumerate(lengths):
        task.model.zero_grad()
        outputs = task.model(x[i : i + 1, :length]).logits
        task.measurement(outputs, y[i : i + 1], measurement).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in task.model.parameters()]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def data():
    return padded_tokens(10, seed=1), padded_tokens(3, seed=2)


def test_dense_graddot_equals_autograd_on_unpadded_examples(data):
    (x, y, lengths), (xt, yt, lt) = data
    task = ClassificationTask(gpt2_classifier())
    method = GradientSimilarity(task, proj_dim=None, batch_size=4).fit((x, y))
    assert task.vmap_failure is not None and "vmap" in task.vmap_failure
    assert method.describe_projection()["vectorized"] is False
    train = autograd_rows(task, x, y, lengths, "loss")
    query = autograd_rows(task, xt, yt, lt, "output")
    expected = (query @ train.T).numpy()
    np.testing.assert_allclose(method.score((xt, yt)), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 1e-2  # not vacuous


def test_trak_equals_its_formula_on_projected_autograd_gradients(data):
    (x, y, lengths), (xt, yt, lt) = data
    task = ClassificationTask(gpt2_classifier())
    method = TRAK(task, proj_dim=24, gradient="auto", batch_size=4).fit((x, y))
    projector = method.featurizer(0).projector
    phi = projector.project(autograd_rows(task, x, y, lengths, "output")).double().numpy()
    query = projector.project(autograd_rows(task, xt, yt, lt, "output")).double().numpy()
    with torch.no_grad():
        probs = torch.cat([task.model(x[i : i + 1, :n]).logits for i, n in enumerate(lengths)])
    q = 1.0 - probs.softmax(1).gather(1, y[:, None]).squeeze(1).double().numpy()
    kernel = phi.T @ phi + method.lambdas[0] * np.eye(phi.shape[1])
    expected = query @ np.linalg.solve(kernel, (phi * q[:, None]).T)
    np.testing.assert_allclose(method.score((xt, yt)), expected, rtol=2e-3, atol=1e-4)


def test_factored_path_equals_kronecker_projection_of_autograd(data):
    (x, y, lengths), _ = data
    task = ClassificationTask(gpt2_classifier())
    method = GradientSimilarity(task, proj_dim=64, gradient="factored", batch_size=5).fit((x, y))
    featurizer = method.featurizer(0)
    kinds = {layer.kind for layer in featurizer.capture.layers}
    assert {"embedding", "conv1d", "linear"} <= kinds
    expected = []
    for i, length in enumerate(lengths):
        task.model.zero_grad()
        (-task.loss(task.model(x[i : i + 1, :length]).logits, y[i : i + 1])).sum().backward()
        parts = []
        for layer, projector in zip(featurizer.capture.layers, featurizer.projectors, strict=True):
            weight = layer.module.weight.grad
            weight = weight if layer.kind == "linear" else weight.T  # Conv1D/Embedding: (in, out)
            bias = getattr(layer.module, "bias", None)
            if bias is not None:
                weight = torch.cat([weight, bias.grad[:, None]], dim=1)
            parts.append(weight.reshape(-1) @ projector.dense_equivalent())
        expected.append(torch.cat(parts))
    np.testing.assert_allclose(
        method.train_vectors(), torch.stack(expected).numpy(), rtol=1e-3, atol=1e-4
    )


def test_without_pad_token_batches_fail_with_a_clear_error(data):
    (x, y, _), _ = data
    task = ClassificationTask(gpt2_classifier(pad_token_id=None))
    with pytest.raises(AttributionError, match="pad_token_id"):
        GradientSimilarity(task, proj_dim=16, gradient="factored").fit((x, y))
