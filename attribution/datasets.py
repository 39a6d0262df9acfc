"""Built-in datasets for demos, tests and benchmarks (bundled with scikit-learn: no download)."""

from __future__ import annotations

import numpy as np
import torch

from attribution.data import Examples
from attribution.errors import AttributionError


def load_digits_split(
    n_train: int = 1000, n_test: int = 300, seed: int = 0
) -> tuple[Examples, Examples]:
    """scikit-learn's 8×8 digits: a fixed seeded split, standardised with the train statistics.

    x ← (x − μ_train) / σ_train per pixel (σ = 1 where a pixel is constant in train);
    inputs are float32 ``(n, 64)``, labels int64 in [0, 9].
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    total = x.shape[0]
    if n_train < 1 or n_test < 1 or n_train + n_test > total:
        raise AttributionError(
            f"digits has {total} examples: n_train ({n_train}) and n_test ({n_test}) must be "
            f"positive and sum to at most {total}"
        )
    order = np.random.default_rng(seed).permutation(total)
    train_idx, test_idx = order[:n_train], order[n_train : n_train + n_test]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std < 1e-8] = 1.0  # constant pixels (the image border) stay 0 after centring

    def part(index: np.ndarray) -> Examples:
        xs = torch.from_numpy(((x[index] - mean) / std).astype(np.float32))
        return Examples(xs, torch.from_numpy(y[index].astype(np.int64)))

    return part(train_idx), part(test_idx)


def flip_labels(
    y: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly round(fraction · n) labels, each to a uniformly drawn *different* class.

    Returns ``(noisy_y, flipped)`` where ``flipped`` is a bool mask of the changed examples.
    The input is not modified.
    """
    if y.ndim != 1:
        raise AttributionError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise AttributionError(f"fraction must lie in [0, 1], got {fraction}")
    if num_classes < 2:
        raise AttributionError(f"flipping labels needs at least 2 classes, got {num_classes}")
    n = int(y.shape[0])
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise AttributionError(
            f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    # adding 1..C−1 modulo C moves a label to each other class with equal probability
    shift = rng.integers(1, num_classes, size=chosen.shape[0])
    noisy = y.clone()
    index = torch.from_numpy(chosen).long()
    noisy[index] = (y[index] + torch.from_numpy(shift).to(y.dtype)) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[index] = True
    return noisy, flipped
