"""Turn what users pass (``(X, y)`` tensors or arrays, or a torch Dataset) into checked batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from attribution.errors import AttributionError


@dataclass
class Examples:
    """A checked, in-memory set of examples: inputs ``x`` and targets ``y`` (first dim = n)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` slices of at most ``batch_size`` examples, in order."""
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> Examples:
        """The examples at ``index`` (a list of positions or a boolean mask)."""
        index = torch.as_tensor(np.asarray(index))
        return Examples(self.x[index], self.y[index])


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise AttributionError(f"{name} could not be turned into a tensor: {err}") from err


def as_examples(data: object, *, what: str = "data") -> Examples:
    """Accept ``(X, y)``, an :class:`Examples`, or a Dataset of ``(x, y)`` pairs; validate it.

    Raises :class:`AttributionError` for an empty set, mismatched lengths or NaN/inf inputs.
    """
    if isinstance(data, Examples):
        x, y = data.x, data.y
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = _as_tensor(data[0], f"{what} inputs"), _as_tensor(data[1], f"{what} targets")
    elif isinstance(data, Dataset):
        x, y = _stack_dataset(data, what)
    else:
        raise AttributionError(
            f"{what} must be a pair (X, y) of tensors/arrays or a torch Dataset of (x, y) pairs, "
            f"not {type(data).__name__}"
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise AttributionError(f"{what} is empty: at least one example is needed")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        got = "a scalar" if y.ndim == 0 else str(y.shape[0])
        raise AttributionError(
            f"{what} has {x.shape[0]} inputs but {got} targets; give one target per input"
        )
    for tensor, part in ((x, "inputs"), (y, "targets")):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(1).sum())
            raise AttributionError(f"{what} {part} contain NaN or infinite values ({bad} examples)")
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return Examples(x, y)


def _stack_dataset(dataset: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise AttributionError(f"{what} Dataset must define __len__") from err
    if n == 0:
        raise AttributionError(f"{what} is empty: at least one example is needed")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise AttributionError(f"{what}[{i}] must be an (x, y) pair, got {type(item).__name__}")
        xs.append(_as_tensor(item[0], f"{what}[{i}] input"))
        ys.append(_as_tensor(item[1], f"{what}[{i}] target"))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise AttributionError(
            f"{what} inputs have different shapes {sorted(shapes)[:3]}; pad them"
        )
    return torch.stack(xs), torch.stack(ys)
