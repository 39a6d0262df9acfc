"""Small real models trained inside the tests (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

torch.set_num_threads(1)  # tiny models: more threads only add contention


def fit_full_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 300
) -> nn.Module:
    """Minimise mean cross-entropy + (wd/2)‖θ‖² with L-BFGS (converges on these small problems)."""
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@pytest.fixture(scope="session")
def fit():
    """The full-batch trainer, for tests that retrain."""
    return fit_full_batch


@pytest.fixture(scope="session")
def digits_small():
    """300 train / 60 test standardised digits of classes 0-4, plus a bias feature."""
    data = load_digits()
    keep = data.target < 5
    x = data.data[keep][:360].astype(np.float32)
    y = data.target[keep][:360]
    x = (x - x[:300].mean(0)) / (x[:300].std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    x, y = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    return (x[:300], y[:300]), (x[300:], y[300:])


@pytest.fixture(scope="session")
def logreg(digits_small):
    """Converged L2-regularised multinomial logistic regression (no bias: a ones column)."""
    (x, y), _ = digits_small
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 5, bias=False)
    nn.init.zeros_(model.weight)
    fit_full_batch(model, x, y, weight_decay=1e-2)
    return model


@pytest.fixture(scope="session")
def small_mlp(digits_small):
    (x, y), _ = digits_small
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 16), nn.ReLU(), nn.Linear(16, 5))
    fit_full_batch(model, x, y, weight_decay=1e-3, steps=200)
    return model
