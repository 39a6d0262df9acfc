"""Curvature of the training objective: explicit GGN/Hessian, matrix-free products, EK-FAC.

The training objective is J(θ) = (1/n) Σ_i L_i(θ) (+ weight decay, which the damping stands in
for). Its Gauss–Newton matrix is G = (1/n) Σ_i J_iᵀ H_i J_i with J_i = ∂outputs_i/∂θ and H_i the
Hessian of L_i with respect to the outputs; G is positive semi-definite, unlike the Hessian.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.gradients import Layer, LayerCapture, layer_gradients, supported_layers
from attribution.tasks import Task

MAX_EXPLICIT_PARAMETERS = 40_000


class FlatParams:
    """Conversion between the task's parameter dict and one flat vector θ ∈ R^p."""

    def __init__(self, task: Task) -> None:
        params = task.params()
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.theta = torch.cat([p.reshape(-1) for p in params.values()])
        self.buffers = dict(task.model.named_buffers())
        self.task = task

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat, self.sizes)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def outputs_fn(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """θ ↦ model outputs on ``x``."""

        def fn(flat: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.task.model, {**self.buffers, **self.unflatten(flat)}, (x,))
            return getattr(out, "logits", out)

        return fn


def _check_explicit(p: int) -> None:
    if p > MAX_EXPLICIT_PARAMETERS:
        raise AttributionError(
            f"an explicit {p}×{p} curvature matrix is too large; use solver='ekfac' or 'cg' "
            f"(exact influence is limited to {MAX_EXPLICIT_PARAMETERS} parameters)"
        )


def ggn_matrix(task: Task, examples: Examples, batch_size: int = 64) -> torch.Tensor:
    """Explicit G = (1/n) Σ_i J_iᵀ H_i J_i (p, p), float64, for the loaded checkpoint."""
    flat = FlatParams(task)
    p = flat.theta.numel()
    _check_explicit(p)
    total = torch.zeros(p, p, dtype=torch.float64, device=flat.theta.device)
    for x, y in examples.batches(batch_size):
        x, y = x.to(flat.theta.device), y.to(flat.theta.device)

        def single_outputs(theta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            return flat.outputs_fn(xi.unsqueeze(0))(theta)[0]

        jac = vmap(jacrev(single_outputs), in_dims=(None, 0))(flat.theta, x)  # (B, *out, p)
        outputs = flat.outputs_fn(x)(flat.theta).detach()

        def single_loss(o: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return task.loss(o.unsqueeze(0), yi.unsqueeze(0))[0]

        out_dim = outputs[0].numel()
        if out_dim > 4096:
            raise AttributionError(
                "explicit GGN needs the Hessian of the loss in the outputs, too large here; "
                "use solver='ekfac' or 'cg'"
            )
        h_out = vmap(hessian(single_loss))(outputs, y).reshape(x.shape[0], out_dim, out_dim)
        jac = jac.reshape(x.shape[0], out_dim, p)
        total += torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac).double()
    return total / len(examples)


def hessian_matrix(task: Task, examples: Examples, batch_size: int = 64) -> torch.Tensor:
    """Explicit Hessian of (1/n) Σ_i L_i (p, p), float64, column blocks via batched HVPs."""
    flat = FlatParams(task)
    p = flat.theta.numel()
    _check_explicit(p)
    eye = torch.eye(p, device=flat.theta.device)
    columns = [
        hessian_vector_products(task, examples, eye[i : i + 512], batch_size)
        for i in range(0, p, 512)
    ]
    full = torch.cat(columns).double()
    return 0.5 * (full + full.T)


def _loss_fn(task: Task, flat: FlatParams, x: torch.Tensor, y: torch.Tensor):
    def fn(theta: torch.Tensor) -> torch.Tensor:
        return task.loss(flat.outputs_fn(x)(theta), y).sum()

    return fn


def hessian_vector_products(
    task: Task, examples: Examples, vectors: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """H V for the rows of ``vectors`` (m, p): H = Hessian of (1/n) Σ_i L_i."""
    flat = FlatParams(task)
    result = torch.zeros_like(vectors)
    for x, y in examples.batches(batch_size):
        x, y = x.to(vectors.device), y.to(vectors.device)
        grad_fn = grad(_loss_fn(task, flat, x, y))
        result += vmap(lambda v, g=grad_fn: jvp(g, (flat.theta,), (v,))[1])(vectors)
    return result / len(examples)


def ggn_vector_products(
    task: Task, examples: Examples, vectors: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """G V for the rows of ``vectors`` (m, p), matrix-free: Jᵀ (H_out (J v))."""
    flat = FlatParams(task)
    result = torch.zeros_like(vectors)
    for x, y in examples.batches(batch_size):
        x, y = x.to(vectors.device), y.to(vectors.device)
        model = flat.outputs_fn(x)
        outputs, pull = vjp(model, flat.theta)
        outputs = outputs.detach()
        loss_grad = grad(lambda o, y=y: task.loss(o, y).sum())
        jv = vmap(lambda v, model=model: jvp(model, (flat.theta,), (v,))[1])(vectors)
        hjv = vmap(lambda t, lg=loss_grad, o=outputs: jvp(lg, (o,), (t,))[1])(jv)
        result += vmap(lambda t, pull=pull: pull(t)[0])(hjv)
    return result / len(examples)


def curvature_products(task: Task, examples: Examples, kind: str, batch_size: int):
    """A function V ↦ C V for C the GGN (``"ggn"``) or Hessian (``"full"``)."""
    if kind == "ggn":
        return lambda v: ggn_vector_products(task, examples, v, batch_size)
    if kind == "full":
        return lambda v: hessian_vector_products(task, examples, v, batch_size)
    raise AttributionError(f"hessian must be 'ggn' or 'full', not {kind!r}")


def mean_eigenvalue(
    products, p: int, device: torch.device, probes: int = 16, seed: int = 0
) -> float:
    """tr(C)/p by Hutchinson's estimator with Rademacher probes."""
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randint(0, 2, (probes, p), generator=generator).float() * 2 - 1).to(device)
    return float((z * products(z)).sum() / probes / p)


def top_eigenvalue(
    products, p: int, device: torch.device, iterations: int = 20, seed: int = 0
) -> float:
    """Largest eigenvalue of a PSD C by power iteration."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, p, generator=generator).to(device)
    value = 0.0
    for _ in range(iterations):
        w = products(v / v.norm())
        value = float(w.norm())
        v = w
    return value


def conjugate_gradient(
    products, rhs: torch.Tensor, damping: float, iterations: int, tolerance: float
) -> torch.Tensor:
    """Solve (C + λI) X = B for the rows of ``rhs`` (m, p), each row its own CG run."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rr = (r * r).sum(1)
    norm_b = rhs.norm(dim=1).clamp_min(1e-30)
    for _ in range(iterations):
        if bool((rr.sqrt() / norm_b < tolerance).all()):
            break
        cd = products(d) + damping * d
        alpha = rr / (d * cd).sum(1).clamp_min(1e-30)
        x += alpha[:, None] * d
        r -= alpha[:, None] * cd
        rr_new = (r * r).sum(1)
        d = r + (rr_new / rr.clamp_min(1e-30))[:, None] * d
        rr = rr_new
    return x


def lissa(
    task: Task,
    examples: Examples,
    rhs: torch.Tensor,
    damping: float,
    scale: float,
    depth: int,
    batch_size: int,
    kind: str,
    seed: int = 0,
) -> torch.Tensor:
    """LiSSA: (C + λI)⁻¹ b ≈ (1/s) Σ_{j<J} (I − (C_j + λI)/s)^j b with minibatch curvature C_j.

    Recursion x_0 = b, x_j = b + x_{j−1} − (C_j + λI) x_{j−1}/s, answer x_J/s. Needs s above
    the largest eigenvalue; converges in about s/λ steps, so a finite depth acts as extra damping.
    """
    generator = torch.Generator().manual_seed(seed)
    x = rhs.clone()
    for _ in range(depth):
        index = torch.randint(
            0, len(examples), (min(batch_size, len(examples)),), generator=generator
        )
        batch = examples.subset(index)
        cx = curvature_products(task, batch, kind, batch_size)(x)
        x = rhs + x - (cx + damping * x) / scale
    return x / scale


# --- EK-FAC ---------------------------------------------------------------------------------
class EKFACFactors:
    """Eigen-corrected Kronecker factors of the Fisher, per Linear/Conv layer.

    F_l ≈ (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ with Q_A, Q_S the eigenvectors of the input and
    output-gradient covariances A = E[a aᵀ], S = E[δ δᵀ], and Λ_ij = E[(Q_Sᵀ G Q_A)_ij²] the
    variance of per-example gradients G in that basis (George et al., 2018). Targets are sampled
    from the model (true Fisher), with a fixed seed.
    """

    def __init__(self, task: Task, examples: Examples, batch_size: int, seed: int = 0) -> None:
        self._attach(task)
        capture = self.capture
        n = len(examples)
        a_cov = [torch.zeros(layer.d_in, layer.d_in) for layer in self.layers]
        s_cov = [torch.zeros(layer.d_out, layer.d_out) for layer in self.layers]
        tokens = [0] * len(self.layers)
        for x, y in self._sampled(task, examples, batch_size, seed):
            _, captured = capture.run(task, x, lambda out, y=y: task.loss(out, y))
            for i, (acts, deltas) in enumerate(captured):
                acts, deltas = acts.double().cpu(), deltas.double().cpu()
                a_cov[i] += torch.einsum("bti,btj->ij", acts, acts).float()
                s_cov[i] += torch.einsum("bti,btj->ij", deltas, deltas).float()
                tokens[i] += acts.shape[0] * acts.shape[1]
        self.q_a = [torch.linalg.eigh(a / t)[1] for a, t in zip(a_cov, tokens, strict=True)]
        self.q_s = [torch.linalg.eigh(s / n)[1] for s in s_cov]
        self.eigenvalues = [torch.zeros(layer.d_out, layer.d_in) for layer in self.layers]
        for x, y in self._sampled(task, examples, batch_size, seed):
            _, captured = capture.run(task, x, lambda out, y=y: task.loss(out, y))
            for i, rotated in enumerate(self._rotated(captured)):
                self.eigenvalues[i] += (rotated**2).sum(0)
        self.eigenvalues = [e / n for e in self.eigenvalues]

    def _attach(self, task: Task) -> None:
        """The layers EK-FAC covers in ``task.model`` and the hooks that capture them."""
        self.layers: list[Layer] = [
            layer for layer in supported_layers(task.model) if layer.kind != "embedding"
        ]
        self.capture = LayerCapture(self.layers)

    @classmethod
    def from_state(cls, task: Task, state: dict, prefix: str) -> EKFACFactors:
        """Factors saved by :meth:`state` for the same architecture, without refitting."""
        factors = cls.__new__(cls)
        factors._attach(task)
        try:
            for name in ("q_a", "q_s", "eigenvalues"):
                setattr(factors, name, [
                    torch.as_tensor(np.asarray(state[f"{prefix}.{name}.{i}"]), dtype=torch.float32)
                    for i in range(len(factors.layers))
                ])
        except KeyError as err:
            raise AttributionError(f"EK-FAC state is missing {err}; was it saved by EK-FAC?") from err
        for layer, q_a, q_s, lam in zip(
            factors.layers, factors.q_a, factors.q_s, factors.eigenvalues, strict=True
        ):
            if q_a.shape != (layer.d_in,) * 2 or lam.shape != (layer.d_out, layer.d_in) \
                    or q_s.shape != (layer.d_out,) * 2:
                raise AttributionError(
                    f"EK-FAC state does not fit layer {layer.name} ({layer.d_out}×{layer.d_in}): "
                    "it was saved for another architecture"
                )
        return factors

    @staticmethod
    def _sampled(task: Task, examples: Examples, batch_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        device = next(task.model.parameters()).device
        for x, _ in examples.batches(batch_size):
            x = x.to(device)
            with torch.no_grad():
                outputs = task.forward(x)
            yield x, task.sample_targets(outputs, generator)

    def _rotated(self, captured) -> list[torch.Tensor]:
        """Q_Sᵀ G Q_A per layer for per-example gradients G, each (B, d_out, d_in)."""
        rotated = []
        for layer, q_a, q_s, (acts, deltas) in zip(
            self.layers, self.q_a, self.q_s, captured, strict=True
        ):
            g = layer_gradients(layer, acts.cpu().float(), deltas.cpu().float())
            rotated.append(q_s.T @ g @ q_a)
        return rotated

    def layer_gradients(self, task: Task, x: torch.Tensor, objective) -> list[torch.Tensor]:
        """Per-example gradients (B, d_out, d_in) of Σ objective, per covered layer."""
        _, captured = self.capture.run(task, x, objective)
        return [
            layer_gradients(layer, a.cpu().float(), d.cpu().float())
            for layer, (a, d) in zip(self.layers, captured, strict=True)
        ]

    def precondition(self, grads: list[torch.Tensor], dampings: list[float]) -> list[torch.Tensor]:
        """(F_l + λ_l I)⁻¹ G per layer, in the eigenbasis: Q_S [(Q_SᵀGQ_A)/(Λ+λ)] Q_Aᵀ."""
        out = []
        for g, q_a, q_s, lam, damp in zip(
            grads, self.q_a, self.q_s, self.eigenvalues, dampings, strict=True
        ):
            out.append(q_s @ ((q_s.T @ g @ q_a) / (lam + damp)) @ q_a.T)
        return out

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {}
        for i in range(len(self.layers)):
            state[f"{prefix}.q_a.{i}"] = self.q_a[i]
            state[f"{prefix}.q_s.{i}"] = self.q_s[i]
            state[f"{prefix}.eigenvalues.{i}"] = self.eigenvalues[i]
        return state
