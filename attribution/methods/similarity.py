"""Gradient similarity (Grad-Dot / Grad-Cos) and TracIn."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.methods.base import GradientArguments, GradientMethod, MethodArguments
from attribution.tasks import Measurement


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclasses.dataclass
class SimilarityArguments(GradientArguments):
    kind: str = "dot"  # "dot" or "cos"

    def validate(self) -> None:
        super().validate()
        if self.kind not in ("dot", "cos"):
            raise AttributionError(f"kind must be 'dot' or 'cos', not {self.kind!r}")


class GradientSimilarity(GradientMethod):
    """Grad-Dot ⟨∇m(test), −∇L(train)⟩ or Grad-Cos (the same with unit vectors).

    Uses the last checkpoint unless ``checkpoints`` says otherwise; several checkpoints are
    averaged: (1/C) Σ_c ⟨·,·⟩ = ⟨concat_c u_c/√C, concat_c v_c/√C⟩.
    """

    name: ClassVar[str] = "graddot"
    arguments_class: ClassVar[type[MethodArguments]] = SimilarityArguments
    default_checkpoints: ClassVar[str] = "last"

    def __init__(self, task, kind: str = "dot", device=None, **kwargs) -> None:
        super().__init__(task, device, kind=kind, **kwargs)
        self.name = "graddot" if kind == "dot" else "gradcos"  # type: ignore[misc]

    def _vectors(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        scale = len(self.args.checkpoints) ** -0.5
        parts = []
        for c in self.args.checkpoints:
            feats, _ = self.features(examples, c, measurement)
            parts.append((_unit_rows(feats) if self.args.kind == "cos" else feats) * scale)
        return torch.cat(parts, dim=1).numpy()

    def featurize_train(self, examples: Examples) -> np.ndarray:
        return self._vectors(examples, "loss")

    def _query(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        return self._vectors(examples, measurement)


class TracIn(GradientMethod):
    """TracIn-CP: Σ_c η_c ⟨∇m_c(test), −∇L_c(train)⟩ over the task's checkpoints.

    Written as one inner product: ⟨concat_c √η_c P_c ∇m_c, concat_c √η_c P_c (−∇L_c)⟩, exact when
    ``proj_dim`` is None, else with an independent projection P_c per checkpoint. A checkpoint
    without a learning rate counts with η = 1.
    """

    name: ClassVar[str] = "tracin"

    def _vectors(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        parts = []
        for c in self.args.checkpoints:
            lr = self.task.checkpoints[c].learning_rate
            feats, _ = self.features(examples, c, measurement)
            parts.append(feats * (1.0 if lr is None else lr) ** 0.5)
        return torch.cat(parts, dim=1).numpy()

    def featurize_train(self, examples: Examples) -> np.ndarray:
        return self._vectors(examples, "loss")

    def _query(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        return self._vectors(examples, measurement)
