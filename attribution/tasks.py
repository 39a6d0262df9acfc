"""Task adapters: the model-specific seam between a user's ``nn.Module`` and the methods.

A task says three things about a model (after kronfluence's ``Task``):

* the **output** f whose change we attribute (classification: the correct-class margin
  f = z_y − log Σ_{j≠y} exp z_j; causal LM: Σ_t log p(y_t | y_<t); regression: the prediction);
* the per-example **loss** L it was trained on;
* the **out-to-loss weight** q = −∂L/∂f, so that −∇L = q ∇f (classification: q = 1 − p_y).

Every method then scores a (test, train) pair as ⟨query(test), train(i)⟩ where the query is the
gradient of the test's *measurement* (its output f by default, or −L) and the train side is built
from −∇L_i: a positive score means "training on i increased the test's measurement".
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attribution.checkpoints import Checkpoint, StateDict, as_checkpoints, load_into
from attribution.data import Examples
from attribution.errors import AttributionError

Measurement = Literal["output", "loss"]
Params = dict[str, torch.Tensor]


class Task:
    """Base class: holds the model and its checkpoints; subclasses define output and loss."""

    kind: str = "task"

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[StateDict | str | Path | Checkpoint] | None = None,
        learning_rates: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AttributionError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        #: held while a method computes with the model: checkpoints are swapped in place
        self.lock = threading.RLock()
        self.checkpoints = as_checkpoints(checkpoints, learning_rates, model)
        self.loaded_checkpoint: int | None = None
        #: why torch.func.vmap cannot trace the model (set on first failure; see gradients.py)
        self.vmap_failure: str | None = None
        for index, checkpoint in enumerate(self.checkpoints):
            if not isinstance(checkpoint.state, dict):
                continue  # files are checked when first loaded, one at a time
            load_into(model, checkpoint, index)
        self.load_checkpoint(0)

    # --- checkpoints -------------------------------------------------------------------
    def load_checkpoint(self, index: int) -> None:
        """Put the weights of checkpoint ``index`` into the model and switch to eval mode."""
        if self.loaded_checkpoint != index:
            load_into(self.model, self.checkpoints[index], index)
            self.loaded_checkpoint = index
        self.model.eval()

    def params(self) -> Params:
        """The trainable parameters attribution differentiates, detached, by name."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    # --- the model-specific part -----------------------------------------------------------
    def forward(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Model outputs for a batch; with ``params``, a functional call (for torch.func)."""
        try:
            if params is None:
                out = self.model(x)
            else:
                buffers = dict(self.model.named_buffers())
                out = functional_call(self.model, {**buffers, **params}, (x,))
        except ValueError as err:
            if "padding token" not in str(err):
                raise
            # Hugging Face classifiers without config.pad_token_id refuse batches > 1
            raise AttributionError(
                f"{type(self.model).__name__} cannot score a batch of {x.shape[0]}: {err} "
                "Set pad_token_id in the model's config.json to the id the inputs are padded "
                "with (corpora of token ids are padded with 0)."
            ) from err
        return getattr(out, "logits", out)

    def output(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example model output f (shape ``(B,)``)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example training loss L (shape ``(B,)``)."""
        raise NotImplementedError

    def out_to_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """q = −∂L/∂f per example, so that −∇L = q ∇f."""
        raise NotImplementedError

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Targets drawn from the model's own predictive distribution (true Fisher for EK-FAC)."""
        raise NotImplementedError

    def check_targets(self, examples: Examples) -> None:
        """Raise :class:`AttributionError` when targets do not suit the task."""

    # --- shared ------------------------------------------------------------------------------
    def measurement(
        self, outputs: torch.Tensor, y: torch.Tensor, kind: Measurement = "output"
    ) -> torch.Tensor:
        """What a query differentiates: the output f, or the negative loss −L."""
        if kind == "output":
            return self.output(outputs, y)
        if kind == "loss":
            return -self.loss(outputs, y)
        raise AttributionError(f"measurement must be 'output' or 'loss', not {kind!r}")

    def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass that turns shape errors into an :class:`AttributionError`."""
        try:
            return self.forward(x)
        except (RuntimeError, IndexError, ValueError) as err:
            raise AttributionError(
                f"the model rejected inputs of shape {tuple(x.shape)}: {err}. "
                "Check that the examples have the shape the architecture expects."
            ) from err

    def describe(self) -> dict:
        """JSON-friendly summary for manifests."""
        return {
            "kind": self.kind,
            "architecture": type(self.model).__name__,
            "num_parameters": sum(p.numel() for p in self.params().values()),
            "checkpoints": [c.describe() for c in self.checkpoints],
        }


class ClassificationTask(Task):
    """Cross-entropy classification; f is the correct-class margin, q = 1 − p_y."""

    kind = "classification"

    def output(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        correct = outputs.gather(1, y.long().view(-1, 1)).squeeze(1)
        others = outputs.scatter(1, y.long().view(-1, 1), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, y.long(), reduction="none")

    def out_to_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - outputs.softmax(dim=1).gather(1, y.long().view(-1, 1)).squeeze(1)

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        probs = outputs.detach().softmax(dim=1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(outputs.device)

    def check_targets(self, examples: Examples) -> None:
        y = examples.y
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise AttributionError("classification targets must be integer class indices")
        if y.ndim != 1:
            raise AttributionError(
                f"classification targets must be 1-D, got shape {tuple(y.shape)}"
            )
        outputs = self.checked_forward(examples.x[:1])
        if outputs.ndim != 2:
            raise AttributionError(
                f"a classifier must return (batch, classes) logits, got {tuple(outputs.shape)}"
            )
        classes = outputs.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise AttributionError(
                f"class labels must lie in [0, {classes - 1}], got [{int(y.min())}, {int(y.max())}]"
            )


class RegressionTask(Task):
    """Squared error ½(ŷ − y)²; f is the prediction ŷ, q = y − ŷ."""

    kind = "regression"

    @staticmethod
    def _prediction(outputs: torch.Tensor) -> torch.Tensor:
        return outputs.reshape(outputs.shape[0], -1).squeeze(1)

    def output(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._prediction(outputs)

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self._prediction(outputs) - y.reshape(-1).to(outputs.dtype)) ** 2

    def out_to_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1).to(outputs.dtype) - self._prediction(outputs)

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(outputs.shape[0], generator=generator).to(outputs.device)
        return self._prediction(outputs).detach() + noise

    def check_targets(self, examples: Examples) -> None:
        outputs = self.checked_forward(examples.x[:1])
        if outputs.numel() != 1:
            raise AttributionError(
                f"a regression model must return one value per example, got {tuple(outputs.shape)}"
            )
        if examples.y.reshape(len(examples), -1).shape[1] != 1:
            raise AttributionError("regression targets must be one number per example")


class CausalLMTask(Task):
    """Causal language modelling: inputs are token ids, targets are labels (−100 = ignore).

    Labels are aligned with the inputs as in Hugging Face (the shift happens here), so a
    prompt + continuation is scored by labelling only the continuation's tokens.
    f = Σ_t log p(y_t | y_<t) over labelled tokens, L = −f, q = 1.
    """

    kind = "causal-lm"
    ignore_index = -100

    def _token_logprobs(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, labels = outputs[:, :-1], y[:, 1:].long()
        mask = labels != self.ignore_index
        logp = logits.log_softmax(dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(dim=1)

    def output(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._token_logprobs(outputs, y)

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self._token_logprobs(outputs, y)

    def out_to_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones(outputs.shape[0], dtype=outputs.dtype, device=outputs.device)

    def sample_targets(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        probs = outputs.detach().softmax(dim=-1).cpu()
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        sampled = flat.reshape(probs.shape[:-1]).to(outputs.device)
        # labels are aligned with inputs: position t+1 holds the token predicted at t
        return torch.cat([torch.full_like(sampled[:, :1], self.ignore_index), sampled[:, :-1]], 1)

    def check_targets(self, examples: Examples) -> None:
        x, y = examples.x, examples.y
        if x.is_floating_point() or y.is_floating_point():
            raise AttributionError("causal-LM inputs and labels must be integer token ids")
        if x.shape != y.shape:
            raise AttributionError(
                f"causal-LM labels must have the inputs' shape {tuple(x.shape)}, got {tuple(y.shape)}"
            )
        if not (y[:, 1:] != self.ignore_index).any(dim=1).all():
            raise AttributionError(
                "every causal-LM example needs at least one labelled token after the first"
            )
