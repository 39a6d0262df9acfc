"""TRAK (Park et al., ICML 2023): projected gradients, a kernel inverse, out-to-loss weights.

score(test, i) = (1/C) Σ_c φ_c(test)ᵀ (Φ_cᵀΦ_c + λ_c I)⁻¹ φ_c(i) · q_c(i)

with φ_c = P_c ∇f at checkpoint c (f = the model output, e.g. the correct-class margin) and
q_c = −∂L/∂f (1 − p for classification). As an inner product: the query side is
concat_c φ_c(test)/√C and the train side concat_c (Φ_cᵀΦ_c + λ_c I)⁻¹ φ_c(i) q_c(i)/√C.

**Choosing λ.** With λ = 0 (traker's default) the kernel is singular once proj_dim exceeds the
number of training examples and scores collapse to noise. When ``lambda_reg`` is not given we
use λ_c = ``lambda_scale`` × mean eigenvalue of Φ_cᵀΦ_c = ``lambda_scale`` × tr(Φ_cᵀΦ_c)/k. The
rule depends only on the training features (no test data); see benchmarks/RESULTS.md for the
LDS it gives across proj_dims.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.methods.base import GradientArguments, GradientMethod, MethodArguments
from attribution.tasks import Measurement


@dataclasses.dataclass
class TRAKArguments(GradientArguments):
    proj_dim: int | None = 2048
    lambda_reg: float | None = None  # absolute λ; None = lambda_scale × mean eigenvalue
    lambda_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.lambda_reg is not None and self.lambda_reg < 0:
            raise AttributionError(f"lambda_reg must be non-negative, got {self.lambda_reg}")
        if self.lambda_scale <= 0:
            raise AttributionError(f"lambda_scale must be positive, got {self.lambda_scale}")


class TRAK(GradientMethod):
    """TRAK ensembled over the task's checkpoints (independently trained models, ideally)."""

    name: ClassVar[str] = "trak"
    arguments_class: ClassVar[type[MethodArguments]] = TRAKArguments

    def __init__(self, task, proj_dim: int | None = 2048, device=None, **kwargs) -> None:
        super().__init__(task, device, proj_dim=proj_dim, **kwargs)
        self._gram: dict[int, np.ndarray] = {}
        self._inverse: dict[int, np.ndarray] = {}
        self.lambdas: dict[int, float] = {}

    def _split(self, raw: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Raw rows hold [φ_c | q_c] per checkpoint; return (c, φ_c, q_c) triples."""
        width = raw.shape[1] // len(self.args.checkpoints)
        return [
            (c, raw[:, j * width : (j + 1) * width - 1], raw[:, (j + 1) * width - 1])
            for j, c in enumerate(self.args.checkpoints)
        ]

    def featurize_train(self, examples: Examples) -> np.ndarray:
        parts = []
        for c in self.args.checkpoints:
            phi, q = self.features(examples, c, "output")
            parts.extend([phi, q[:, None]])
        return torch.cat(parts, dim=1).numpy()

    def observe(self, raw: np.ndarray) -> None:
        for c, phi, _ in self._split(raw):
            phi64 = phi.astype(np.float64)
            self._gram[c] = self._gram.get(c, 0) + phi64.T @ phi64

    def finalize_state(self) -> None:
        if not self._gram:
            raise AttributionError("TRAK saw no training features: observe() a shard first")
        for c, gram in self._gram.items():
            k = gram.shape[0]
            lam = self.args.lambda_reg
            if lam is None:
                lam = self.args.lambda_scale * float(np.trace(gram)) / k
            lam = max(lam, 1e-12 * max(float(np.trace(gram)), 1.0))
            self.lambdas[c] = lam
            self._inverse[c] = np.linalg.inv(gram + lam * np.eye(k)).astype(np.float32)
        self._state_ready = True

    def transform_train(self, raw: np.ndarray) -> np.ndarray:
        scale = len(self.args.checkpoints) ** -0.5
        parts = [(phi @ self._inverse[c]) * q[:, None] * scale for c, phi, q in self._split(raw)]
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    def _query(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        scale = len(self.args.checkpoints) ** -0.5
        parts = [self.features(examples, c, measurement)[0] * scale for c in self.args.checkpoints]
        return torch.cat(parts, dim=1).numpy()

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {}
        for c in self.args.checkpoints:
            state[f"gram.{c}"] = self._gram[c]
            state[f"inverse.{c}"] = self._inverse[c]
            state[f"lambda.{c}"] = np.array(self.lambdas[c])
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        try:
            for c in self.args.checkpoints:
                self._gram[c] = np.asarray(state[f"gram.{c}"], dtype=np.float64)
                self._inverse[c] = np.asarray(state[f"inverse.{c}"], dtype=np.float32)
                self.lambdas[c] = float(state[f"lambda.{c}"])
        except KeyError as err:
            raise AttributionError(f"TRAK state is missing {err}; was it saved by TRAK?") from err
        self._state_ready = True

    def arguments(self) -> dict:
        args = super().arguments()
        if self.lambdas:
            args["lambdas"] = {str(c): lam for c, lam in self.lambdas.items()}
        return args
