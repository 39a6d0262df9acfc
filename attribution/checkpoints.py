"""Checkpoints: a model's weights at some point of training, with the step's learning rate.

Weights come from an in-memory state dict or a ``.safetensors`` file. Nothing else is ever
loaded from disk: pickle-based formats (``.pt``, ``.bin``, ``.ckpt``) can execute code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attribution.errors import AttributionError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights, plus what TracIn needs to know about when they were taken."""

    state: StateDict | str | Path
    learning_rate: float | None = None
    step: int | None = None

    def load_state(self) -> dict[str, torch.Tensor]:
        """Return the weights as a state dict, reading safetensors files only."""
        if isinstance(self.state, Mapping):
            return dict(self.state)
        return load_safetensors(Path(self.state))

    def describe(self) -> dict:
        """A JSON-friendly description (paths kept, tensors summarised)."""
        source = str(self.state) if not isinstance(self.state, Mapping) else "state_dict"
        return {"source": source, "learning_rate": self.learning_rate, "step": self.step}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file; refuse every other format with an explanation."""
    if path.suffix != ".safetensors":
        raise AttributionError(
            f"checkpoint {path} is not a .safetensors file; pickle-based formats "
            "(.pt, .bin, .ckpt) are refused because loading them can run code. "
            "Convert it with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        )
    if not path.is_file():
        raise AttributionError(f"checkpoint file {path} does not exist")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AttributionError(
            f"checkpoint {path} is not a readable safetensors file: {err}"
        ) from err


def as_checkpoints(
    checkpoints: Sequence[StateDict | str | Path | Checkpoint] | None,
    learning_rates: Sequence[float] | None,
    model: nn.Module,
) -> list[Checkpoint]:
    """Normalise the user's checkpoint list; default to the model's current weights."""
    if not checkpoints:
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints = [snapshot]
    if learning_rates is not None and len(learning_rates) != len(checkpoints):
        raise AttributionError(
            f"got {len(learning_rates)} learning rates for {len(checkpoints)} checkpoints; "
            "give one learning rate per checkpoint or none"
        )
    result = []
    for index, item in enumerate(checkpoints):
        lr = None if learning_rates is None else float(learning_rates[index])
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise AttributionError(f"learning rate {lr} of checkpoint {index} must be positive")
        if isinstance(item, Checkpoint):
            result.append(item if lr is None else Checkpoint(item.state, lr, item.step))
        else:
            result.append(Checkpoint(item, lr, index))
    return result


def load_into(model: nn.Module, checkpoint: Checkpoint, index: int = 0) -> None:
    """Copy a checkpoint's weights into ``model``; name every mismatch if it does not fit."""
    state = checkpoint.load_state()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if tuple(state[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    if wrong_shape:
        problems.append(f"shape mismatches {wrong_shape[:5]}")
    if problems:
        raise AttributionError(
            f"checkpoint {index} ({checkpoint.describe()['source']}) does not fit the "
            f"architecture: {'; '.join(problems)}"
        )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AttributionError(f"checkpoint {index} has NaN or infinite values in {name}")
    model.load_state_dict(state, strict=True)
