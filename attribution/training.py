"""Deterministic training that records the checkpoints TracIn and TRAK need.

The objective minimised is

    J(θ) = (1/n) Σ_i L(x_i, y_i; θ) + (λ/2)·‖θ‖²        (λ = ``weight_decay``)

over every trainable parameter (biases included). Influence functions differentiate exactly this
J: its Hessian is (1/n) Σ_i ∇²L_i + λI. The decay is *coupled* L2 (added to the gradient, as
``torch.optim.SGD``/``Adam`` do), so that at convergence ∇J(θ*) = 0 for this J.

Determinism: the model's initial weights come from the caller (see :mod:`attribution.models`),
minibatch order from a ``torch.Generator`` seeded with ``config.seed``; no global RNG is read or
advanced. Same weights + same data + same config → bitwise the same checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from attribution.checkpoints import Checkpoint
from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.tasks import Task

TaskFactory = Callable[[nn.Module], Task]
"""Anything that wraps a model in a Task: a Task class such as ``ClassificationTask`` itself."""


@dataclass
class TrainConfig:
    """Every knob of :func:`train`; JSON-friendly via :meth:`to_dict`.

    ``batch_size=None`` trains full-batch. ``checkpoints`` evenly spaced snapshots are kept along
    the trajectory, the last one being the final weights. ``schedule`` scales the learning rate:
    ``constant``, or ``cosine`` η_t = η·½(1 + cos(π t / T)) which settles the weights close to the
    optimum (retraining noise, and so LDS, depends on it). ``num_threads`` caps torch's
    intra-op CPU threads while training (restored afterwards; None = leave as is): tiny models gain
    nothing from threads, and on a busy machine two threads measured 10–20× slower than one.
    """

    epochs: int = 500
    learning_rate: float = 1e-2
    weight_decay: float = 1e-3
    batch_size: int | None = None
    optimizer: Literal["sgd", "adam"] = "adam"
    momentum: float = 0.0
    seed: int = 0
    checkpoints: int = 1
    schedule: Literal["constant", "cosine"] = "cosine"
    num_threads: int | None = None

    def validate(self) -> None:
        """Raise :class:`AttributionError` naming the first bad field."""
        if self.epochs < 1:
            raise AttributionError(f"epochs must be at least 1, got {self.epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise AttributionError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise AttributionError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if self.batch_size is not None and self.batch_size < 1:
            raise AttributionError(f"batch_size must be at least 1 or None, got {self.batch_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise AttributionError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise AttributionError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.checkpoints < 1:
            raise AttributionError(f"checkpoints must be at least 1, got {self.checkpoints}")
        if self.schedule not in ("constant", "cosine"):
            raise AttributionError(
                f"schedule must be 'constant' or 'cosine', got {self.schedule!r}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise AttributionError(
                f"num_threads must be at least 1 or None, got {self.num_threads}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DIGITS_MLP_CONFIG = TrainConfig(
    epochs=500, learning_rate=3e-2, weight_decay=1e-3, checkpoints=5, num_threads=1
)
"""Digits MLP 64-128-10 on 1000 standardised examples: full-batch Adam, 500 cosine steps.

Measured: 97–98% test accuracy; on 500-example subsets two init seeds give test margins with
correlation ≈ 0.996 (noise sd ≈ 0.18 against ≈ 0.95 spread across subsets), and exact (GGN)
influence reaches LDS ≈ 0.8 on 50 subsets. ~1 s per 500-example model on one CPU thread.
"""

DIGITS_LOGREG_CONFIG = TrainConfig(
    epochs=500, learning_rate=0.3, weight_decay=1e-3, checkpoints=5, num_threads=1
)
"""Digits logistic regression: convex, and this reaches the optimum (‖∇J‖ ≈ 1e-6, 95% test
accuracy) whatever the initialisation."""

DEFAULT_CONFIGS: dict[str, TrainConfig] = {
    "mlp": DIGITS_MLP_CONFIG,
    "logistic_regression": DIGITS_LOGREG_CONFIG,
    "small_cnn": TrainConfig(
        epochs=300, learning_rate=1e-2, weight_decay=1e-3, checkpoints=5, num_threads=1
    ),
    "tiny_gpt2": TrainConfig(
        epochs=20, learning_rate=3e-3, weight_decay=0.0, batch_size=16, checkpoints=5
    ),
}


def default_config(architecture: str, **overrides: object) -> TrainConfig:
    """Good training defaults for a built-in architecture, with fields overridden by name."""
    key = architecture.strip().lower().replace("-", "_")
    if key not in DEFAULT_CONFIGS:
        raise AttributionError(
            f"no default training config for {architecture!r}; known: {sorted(DEFAULT_CONFIGS)}"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise AttributionError(
            f"TrainConfig has no field(s) {unknown}; fields are {sorted(fields)}"
        )
    return dataclasses.replace(DEFAULT_CONFIGS[key], **overrides)  # type: ignore[arg-type]


@dataclass
class TrainResult:
    """Final weights, the kept checkpoints (last = final) and the per-step mean training loss."""

    state_dict: dict[str, torch.Tensor]
    checkpoints: list[Checkpoint]
    losses: list[float] = field(default_factory=list)
    config: TrainConfig = field(default_factory=TrainConfig)


def as_task(model: nn.Module, task: TaskFactory | Task) -> Task:
    """Wrap ``model`` with a task factory, or check that a Task instance wraps this very model."""
    if isinstance(task, Task):
        if task.model is not model:
            raise AttributionError(
                "the Task instance wraps a different model; pass a Task class (e.g. "
                "ClassificationTask) so that it can wrap the model being trained"
            )
        return task
    if not callable(task):
        raise AttributionError(
            f"task must be a Task class or a callable model -> Task, not {type(task).__name__}"
        )
    wrapped = task(model)
    if not isinstance(wrapped, Task):
        raise AttributionError(
            f"the task factory returned {type(wrapped).__name__}, not an attribution Task"
        )
    return wrapped


def checkpoint_steps(total_steps: int, count: int) -> list[int]:
    """Evenly spaced steps ⌈c·T/C⌉ for c = 1..C (deduplicated); the last is always T."""
    steps = sorted({max(1, math.ceil(c * total_steps / count)) for c in range(1, count + 1)})
    return steps


def _lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate used for update number ``step`` (1-based) of ``total_steps``."""
    if config.schedule == "constant":
        return config.learning_rate
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total_steps))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide); None changes nothing."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    task: TaskFactory | Task,
    examples: Examples,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Minimise J(θ) = mean_i L_i(θ) + (λ/2)‖θ‖² in place on ``model``; return its checkpoints.

    Each checkpoint records its step (updates so far) and the learning rate in effect over the
    stretch of training it stands for: the mean η_t of the updates since the previous checkpoint
    (just η under a constant schedule). TracIn-CP's Σ_c η_c ⟨g_c, g_c'⟩ discretises Σ_t η_t ⟨·,·⟩
    with it; the rate of the very last update alone would be ≈ 0 under a cosine schedule.
    """
    config = config or TrainConfig()
    config.validate()
    if len(examples) == 0:
        raise AttributionError("cannot train on an empty set: at least one example is needed")
    adapter = as_task(model, task)
    with torch_threads(config.num_threads):
        return _train(model, adapter, examples, config)


def _train(model: nn.Module, adapter: Task, examples: Examples, config: TrainConfig) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AttributionError("the model has no trainable parameters")
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            params,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    n = len(examples)
    batch = n if config.batch_size is None else min(config.batch_size, n)
    per_epoch = math.ceil(n / batch)
    total = config.epochs * per_epoch
    keep = set(checkpoint_steps(total, config.checkpoints))
    generator = torch.Generator().manual_seed(config.seed)
    device = next(iter(params)).device
    x_all, y_all = examples.x.to(device), examples.y.to(device)

    checkpoints: list[Checkpoint] = []
    losses: list[float] = []
    step = 0
    lr_since_checkpoint: list[float] = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(device) if batch < n else None
        for start in range(0, n, batch):
            if order is None:
                x, y = x_all, y_all
            else:
                index = order[start : start + batch]
                x, y = x_all[index], y_all[index]
            step += 1
            lr = _lr_at(config, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = adapter.loss(adapter.forward(x), y).mean()
            if not torch.isfinite(loss):
                raise AttributionError(
                    f"training diverged at step {step} (loss {loss.item()}); "
                    f"lower the learning rate (now {config.learning_rate})"
                )
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            lr_since_checkpoint.append(lr)
            if step in keep:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                segment_lr = sum(lr_since_checkpoint) / len(lr_since_checkpoint)
                checkpoints.append(Checkpoint(state, segment_lr, step))
                lr_since_checkpoint = []
    model.eval()
    return TrainResult(dict(checkpoints[-1].state), checkpoints, losses, config)


@torch.no_grad()
def evaluate_outputs(
    model: nn.Module, task: TaskFactory | Task, examples: Examples, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example output f (margin for classification) and loss L of ``model``, in eval mode."""
    adapter = as_task(model, task)
    model.eval()
    outputs, losses = [], []
    device = next(iter(model.parameters())).device
    for x, y in examples.batches(batch_size):
        x, y = x.to(device), y.to(device)
        raw = adapter.forward(x)
        outputs.append(adapter.output(raw, y).float().cpu())
        losses.append(adapter.loss(raw, y).float().cpu())
    return torch.cat(outputs), torch.cat(losses)


def accuracy(model: nn.Module, examples: Examples, batch_size: int = 1024) -> float:
    """Top-1 accuracy of a classifier on ``examples``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in examples.batches(batch_size):
            logits = model(x)
            logits = getattr(logits, "logits", logits)
            correct += int((logits.argmax(dim=1) == y).sum())
    return correct / max(len(examples), 1)
