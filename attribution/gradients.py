"""Per-example gradients, two ways.

* **Dense** (small models): ``torch.func.vmap(grad(·))`` gives every example's full gradient
  g_i ∈ R^p for one batch at a time, optionally followed by a dense random projection.
* **Factored** (larger models, never materialises g_i): forward hooks keep each supported layer's
  inputs a_t and backward gives the output gradients δ_t; a layer's per-example gradient is
  G = Σ_t δ_t a_tᵀ, so its Kronecker projection is Σ_t (P_out δ_t)(P_in a_t)ᵀ (LoGra).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from attribution.errors import AttributionError
from attribution.projectors import DenseProjector, KroneckerProjector, ProjectionKind, derive_seed
from attribution.tasks import Measurement, Task

logger = logging.getLogger(__name__)

GradientMode = Literal["auto", "dense", "factored"]
#: models with more parameters than this use the factored path under ``gradient="auto"``
DENSE_PARAMETER_LIMIT = 2_000_000


def flat_dim(task: Task) -> int:
    """Number of parameters attribution differentiates."""
    return sum(p.numel() for p in task.params().values())


def per_example_gradients(
    task: Task, x: torch.Tensor, y: torch.Tensor, measurement: Measurement
) -> torch.Tensor:
    """Full per-example gradients (B, p) of the measurement, for the loaded checkpoint.

    ``measurement="loss"`` gives −∇L_i (the train side); ``"output"`` gives ∇f_i.
    Vectorised with ``vmap``; a model vmap cannot trace (data-dependent Python control flow,
    e.g. Hugging Face classifiers locating the last non-pad token) is differentiated one
    example at a time instead: the same gradients, only slower. The reason is kept in
    ``task.vmap_failure``.
    """
    params = task.params()

    def one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        outputs = task.forward(xi.unsqueeze(0), params)
        return task.measurement(outputs, yi.unsqueeze(0), measurement)[0]

    if getattr(task, "vmap_failure", None) is None:
        try:
            grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
            return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            task.vmap_failure = str(err).split(". ")[0]
            logger.warning(
                "%s cannot be vectorised with torch.func.vmap (%s); computing per-example "
                "gradients one example at a time",
                type(task.model).__name__,
                task.vmap_failure,
            )
    rows = [grad(one)(params, x[i], y[i]) for i in range(x.shape[0])]
    return torch.stack([torch.cat([g.reshape(-1) for g in row.values()]) for row in rows])


# --- hook-based capture of layer inputs and output gradients ------------------------------
@dataclass
class Layer:
    """A layer whose weight gradient factors as Σ_t δ_t a_tᵀ."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d" (Hugging Face, weight stored (in, out)), "conv2d", "embedding"
    d_in: int  # input width including the bias column
    d_out: int


def supported_layers(model: nn.Module) -> list[Layer]:
    """Linear, Hugging Face Conv1D, Conv2d (groups=1) and Embedding layers, in module order."""
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        bias = int(getattr(module, "bias", None) is not None)
        if isinstance(module, nn.Linear):
            layers.append(
                Layer(name, module, "linear", module.in_features + bias, module.out_features)
            )
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            d_in, d_out = module.weight.shape
            layers.append(Layer(name, module, "conv1d", d_in + bias, d_out))
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            k = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            layers.append(Layer(name, module, "conv2d", k + bias, module.out_channels))
        elif isinstance(module, nn.Embedding):
            layers.append(
                Layer(name, module, "embedding", module.num_embeddings, module.embedding_dim)
            )
    return layers


def _layer_inputs(layer: Layer, inputs: torch.Tensor) -> torch.Tensor:
    """Layer inputs as (B, T, d_in): patches for convolutions, a ones column for the bias."""
    if layer.kind == "embedding":
        return inputs.reshape(inputs.shape[0], -1)
    if layer.kind == "conv2d":
        m = layer.module
        acts = F.unfold(inputs, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    else:
        acts = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if getattr(layer.module, "bias", None) is not None:
        acts = torch.cat([acts, torch.ones_like(acts[..., :1])], dim=-1)
    return acts


def _layer_deltas(layer: Layer, grad_output: torch.Tensor) -> torch.Tensor:
    """Output gradients as (B, T, d_out)."""
    if layer.kind == "conv2d":
        return grad_output.flatten(2).transpose(1, 2)
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


class LayerCapture:
    """Run the model once and return, per layer, inputs a (B,T,d_in) and deltas δ (B,T,d_out).

    δ is the gradient of Σ_b objective_b with respect to the layer output; since examples in a
    batch do not interact (eval mode), row b of δ belongs to example b alone.
    """

    def __init__(self, layers: list[Layer]) -> None:
        if not layers:
            raise AttributionError(
                "the model has no Linear, Conv1D, Conv2d or Embedding layer with trainable weights; "
                "use gradient='dense'"
            )
        self.layers = layers

    def per_example(self, task: Task, x: torch.Tensor) -> LayerCapture:
        """Only the layers whose outputs are per example (drops e.g. shared position embeddings).

        Probed with two copies of the first example: a layer whose output batch is not 2 is
        shared by the batch, and its per-example gradient cannot be recovered from hooks.
        """
        probe = torch.cat([x[:1], x[:1]])
        sizes: dict[int, int] = {}
        handles = [
            layer.module.register_forward_hook(
                lambda _m, _a, out, i=i: sizes.__setitem__(i, out.shape[0])
            )
            for i, layer in enumerate(self.layers)
        ]
        try:
            with torch.no_grad():
                task.forward(probe)
        finally:
            for handle in handles:
                handle.remove()
        return LayerCapture([layer for i, layer in enumerate(self.layers) if sizes.get(i) == 2])

    def run(
        self, task: Task, x: torch.Tensor, objective: callable
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``objective(outputs) -> (B,)``; returns model outputs and [(a, δ)] per layer."""
        inputs: list[torch.Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        outputs: list[torch.Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        handles = []
        for i, layer in enumerate(self.layers):

            def hook(_m, args, out, i=i):
                inputs[i], outputs[i] = args[0].detach(), out

            handles.append(layer.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                model_out = task.forward(x)
                total = objective(model_out).sum()
                deltas = torch.autograd.grad(total, outputs, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        captured = []
        for layer, a, out, d in zip(self.layers, inputs, outputs, deltas, strict=True):
            d = torch.zeros_like(out) if d is None else d
            captured.append((_layer_inputs(layer, a), _layer_deltas(layer, d.detach())))
        return model_out.detach(), captured


def layer_gradients(layer: Layer, acts: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients G = Σ_t δ_t a_tᵀ, shape (B, d_out, d_in)."""
    if layer.kind == "embedding":
        onehot = F.one_hot(acts, layer.d_in).to(deltas.dtype)
        return torch.einsum("bto,bti->boi", deltas, onehot)
    return torch.einsum("bto,bti->boi", deltas, acts)


# --- featurizers: one checkpoint's (projected) per-example gradients ----------------------------
class Featurizer:
    """Maps a batch to (features (B, dim), model outputs) for the loaded checkpoint."""

    dim: int

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, measurement: Measurement
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class DenseFeaturizer(Featurizer):
    """torch.func per-example gradients, then a dense JL projection (or none)."""

    def __init__(
        self,
        task: Task,
        proj_dim: int | None,
        seed: int,
        kind: ProjectionKind = "rademacher",
        device: torch.device | str = "cpu",
    ) -> None:
        self.task = task
        self.p = flat_dim(task)
        self.projector = (
            DenseProjector(self.p, proj_dim, seed, kind, device) if proj_dim is not None else None
        )
        self.dim = proj_dim if proj_dim is not None else self.p

    def __call__(self, x, y, measurement):
        with torch.no_grad():
            outputs = self.task.forward(x)
        grads = per_example_gradients(self.task, x, y, measurement)
        if self.projector is not None:
            grads = self.projector.project(grads)
        return grads.float(), outputs

    def describe(self) -> dict:
        projection = (
            self.projector.describe() if self.projector else {"kind": "none", "dim": self.p}
        )
        described: dict = {"gradient": "dense", "projection": projection}
        if getattr(self.task, "vmap_failure", None) is not None:
            described["vectorized"] = False
            described["vmap_failure"] = self.task.vmap_failure
        return described


class FactoredFeaturizer(Featurizer):
    """LoGra: per-layer Kronecker projections built from hooked inputs and output gradients.

    Layers are chosen on the first batch (shared layers such as position embeddings are left
    out); each covered layer gets k_out = k_in = √(proj_dim / layers), capped by its widths.
    """

    def __init__(
        self,
        task: Task,
        proj_dim: int,
        seed: int,
        kind: ProjectionKind = "rademacher",
        device: torch.device | str = "cpu",
    ) -> None:
        self.task, self.proj_dim, self.seed, self.kind, self.device = (
            task,
            proj_dim,
            seed,
            kind,
            device,
        )
        self.capture = LayerCapture(supported_layers(task.model))
        self.projectors: list[KroneckerProjector] = []
        self.dim = 0

    def _setup(self, x: torch.Tensor) -> None:
        self.capture = self.capture.per_example(self.task, x)
        side = max(1, int((self.proj_dim / len(self.capture.layers)) ** 0.5))
        self.projectors = [
            KroneckerProjector(
                layer.d_out,
                layer.d_in,
                min(side, layer.d_out),
                min(side, layer.d_in),
                derive_seed(self.seed, layer.name),
                self.kind,
                self.device,
            )
            for layer in self.capture.layers
        ]
        self.dim = sum(p.dim for p in self.projectors)

    def __call__(self, x, y, measurement):
        if not self.projectors:
            self._setup(x)
        outputs, captured = self.capture.run(
            self.task, x, lambda out: self.task.measurement(out, y, measurement)
        )
        parts = []
        for layer, projector, (acts, deltas) in zip(
            self.capture.layers, self.projectors, captured, strict=True
        ):
            if layer.kind == "embedding":
                parts.append(projector.project_embedding(deltas, acts))
            else:
                parts.append(projector.project_factors(deltas, acts))
        return torch.cat(parts, dim=1), outputs

    def describe(self) -> dict:
        return {
            "gradient": "factored",
            "projection": {
                "kind": f"kronecker-{self.kind}",
                "dim": self.dim,
                "seed": self.seed,
                "layers": {
                    layer.name: [p.k_out, p.k_in]
                    for layer, p in zip(self.capture.layers, self.projectors, strict=True)
                },
            },
        }


def make_featurizer(
    task: Task,
    mode: GradientMode,
    proj_dim: int | None,
    seed: int,
    kind: ProjectionKind,
    device: torch.device | str,
) -> Featurizer:
    """Pick the dense or factored path (``auto``: dense for models up to 2M parameters)."""
    if mode == "auto":
        mode = "dense" if flat_dim(task) <= DENSE_PARAMETER_LIMIT else "factored"
    if mode == "dense":
        return DenseFeaturizer(task, proj_dim, seed, kind, device)
    if mode == "factored":
        if proj_dim is None:
            raise AttributionError("gradient='factored' needs a proj_dim")
        return FactoredFeaturizer(task, proj_dim, seed, kind, device)
    raise AttributionError(f"gradient must be 'auto', 'dense' or 'factored', not {mode!r}")
