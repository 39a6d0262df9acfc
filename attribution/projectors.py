"""Random projections that shrink gradients while keeping inner products (Johnson–Lindenstrauss).

A dense projector maps g ∈ R^p to Pg ∈ R^k with P_ij ~ ±1/√k (Rademacher) or N(0, 1/k), so
E⟨Pu, Pv⟩ = ⟨u, v⟩. The matrix is generated once, block by block from a seed, and kept in memory
when it fits (``max_cached_bytes``); only larger ones are regenerated per call, which is what made
traker's CPU path slow.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from attribution.errors import AttributionError

ProjectionKind = Literal["rademacher", "gaussian"]
_BLOCK_ROWS = 8192


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts (base seed, checkpoint index, layer name …)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_matrix(
    rows: int, cols: int, seed: int, kind: ProjectionKind = "rademacher"
) -> torch.Tensor:
    """A (rows, cols) float32 matrix with entries of variance 1/cols, deterministic in ``seed``.

    Generated on the CPU so that the same seed gives the same matrix on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
        return (signs.float() * 2.0 - 1.0) / cols**0.5
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator) / cols**0.5
    raise AttributionError(f"projection kind must be 'rademacher' or 'gaussian', not {kind!r}")


class DenseProjector:
    """g ↦ gP for a (p, k) random matrix P, generated in row blocks from one seed."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int,
        kind: ProjectionKind = "rademacher",
        device: torch.device | str = "cpu",
        max_cached_bytes: int = 2 << 30,
    ) -> None:
        if out_dim < 1 or in_dim < 1:
            raise AttributionError(f"projection dims must be positive, got {in_dim} -> {out_dim}")
        self.in_dim, self.out_dim, self.seed, self.kind = in_dim, out_dim, seed, kind
        self.device = torch.device(device)
        self._blocks = [(s, min(s + _BLOCK_ROWS, in_dim)) for s in range(0, in_dim, _BLOCK_ROWS)]
        self._cached: torch.Tensor | None = None
        if in_dim * out_dim * 4 <= max_cached_bytes:
            self._cached = torch.cat([self._block(i) for i in range(len(self._blocks))]).to(
                self.device
            )

    def _block(self, index: int) -> torch.Tensor:
        start, stop = self._blocks[index]
        block = random_matrix(stop - start, self.out_dim, derive_seed(self.seed, index), self.kind)
        return block

    def matrix(self) -> torch.Tensor:
        """The whole (p, k) matrix (for tests and small p)."""
        if self._cached is not None:
            return self._cached
        return torch.cat([self._block(i) for i in range(len(self._blocks))])

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project a batch of flattened gradients (B, p) to (B, k)."""
        if grads.shape[-1] != self.in_dim:
            raise AttributionError(
                f"projector expects vectors of length {self.in_dim}, got {grads.shape[-1]}"
            )
        grads = grads.float()
        if self._cached is not None:
            return grads @ self._cached
        out = torch.zeros(grads.shape[0], self.out_dim, device=grads.device)
        for index, (start, stop) in enumerate(self._blocks):
            out += grads[:, start:stop] @ self._block(index).to(grads.device)
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "dim": self.out_dim, "seed": self.seed}


class KroneckerProjector:
    """Factored projection of one layer's gradient G (d_out, d_in): G ↦ P_out G P_inᵀ.

    Equal to the dense projection (P_out ⊗ P_in) vec(G) without ever forming G per example:
    for G = Σ_t δ_t a_tᵀ it is Σ_t (P_out δ_t)(P_in a_t)ᵀ (LoGra).
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        k_out: int,
        k_in: int,
        seed: int,
        kind: ProjectionKind = "rademacher",
        device: torch.device | str = "cpu",
    ) -> None:
        self.d_out, self.d_in, self.k_out, self.k_in = d_out, d_in, k_out, k_in
        self.p_out = random_matrix(k_out, d_out, derive_seed(seed, "out"), kind).to(device)
        self.p_in = random_matrix(k_in, d_in, derive_seed(seed, "in"), kind).to(device)
        # rows of variance 1/d: rescale so that E‖P x‖² = ‖x‖² as for the dense projector
        self.p_out *= (d_out / k_out) ** 0.5
        self.p_in *= (d_in / k_in) ** 0.5

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def project_factors(self, deltas: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Σ_t (P_out δ_t)(P_in a_t)ᵀ for δ (B, T, d_out), a (B, T, d_in) → (B, k_out·k_in)."""
        left = deltas.float() @ self.p_out.T
        right = acts.float() @ self.p_in.T
        return torch.einsum("bto,bti->boi", left, right).reshape(deltas.shape[0], -1)

    def project_embedding(self, deltas: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """As :meth:`project_factors` for a one-hot input: P_in a_t is column ``id_t`` of P_in."""
        left = deltas.float() @ self.p_out.T
        right = self.p_in.T[token_ids]
        return torch.einsum("bto,bti->boi", left, right).reshape(deltas.shape[0], -1)

    def dense_equivalent(self) -> torch.Tensor:
        """(P_out ⊗ P_in)ᵀ as a (d_out·d_in, k) matrix, for checking against materialised G."""
        return torch.kron(self.p_out, self.p_in).T
