"""Causal language models on token ids: training batches, prompt/output queries, a tiny trainer.

The examples follow Hugging Face's convention (labels aligned with the inputs, −100 = ignored),
which :class:`attribution.tasks.CausalLMTask` shifts itself. For provenance the query is the
log-likelihood of an *output* given its *prompt*,

    f = Σ_{t ∈ output} log p(x_t | x_<t),

so the prompt's positions are labelled −100: its tokens condition the output but are not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.tasks import CausalLMTask
from attribution.training import TrainConfig, TrainResult, train

IGNORE_INDEX = -100
PAD_ID = 0


def padded_examples(
    sequences: Sequence[Sequence[int]], max_length: int, pad_id: int = PAD_ID
) -> Examples:
    """Token sequences as (inputs, labels): right-padded, cut at ``max_length``, padding ignored."""
    if not sequences:
        raise AttributionError("no sequences: at least one is needed")
    length = min(max(len(s) for s in sequences), max_length)
    x = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    y = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(list(seq)[:length], dtype=torch.long)
        x[i, : len(ids)] = ids
        y[i, : len(ids)] = ids
    return Examples(x, y)


@dataclass
class PromptOutput:
    """One (prompt, output) query: the example, and how many tokens of each were kept."""

    examples: Examples
    prompt_tokens: int
    output_tokens: int
    truncated: bool


def prompt_output_example(
    prompt: Sequence[int], output: Sequence[int], max_length: int
) -> PromptOutput:
    """The example whose measurement is log p(output | prompt); prompt labels are −100.

    When prompt + output exceed the model's context ``max_length``, the prompt is cut from the
    left first (the output is what is attributed), then the output is cut at the end.
    """
    if not output:
        raise AttributionError("the output has no tokens: there is nothing to attribute")
    if max_length < 2:
        raise AttributionError(f"max_length must be at least 2, got {max_length}")
    # the first position is never scored (nothing predicts it): keep one prompt token if any
    out = list(output)[: max_length - 1 if prompt else max_length]
    keep = min(len(prompt), max_length - len(out))
    if not prompt and len(out) < 2:
        raise AttributionError(
            "a one-token output without a prompt has no predicted token; give a prompt"
        )
    pre = list(prompt)[len(prompt) - keep :]
    ids = pre + out
    labels = [IGNORE_INDEX] * len(pre) + out
    x = torch.tensor([ids], dtype=torch.long)
    y = torch.tensor([labels], dtype=torch.long)
    truncated = len(pre) < len(prompt) or len(out) < len(output)
    return PromptOutput(Examples(x, y), len(pre), len(out), truncated)


def train_causal_lm(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    max_length: int,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train ``model`` (in place) on the sequences by next-token cross-entropy.

    Minimises J(θ) = (1/n) Σ_i −Σ_t log p(x_{i,t} | x_{i,<t}) (+ weight decay), see
    :func:`attribution.training.train`; long enough training makes a tiny model memorise.
    """
    return train(model, CausalLMTask, padded_examples(sequences, max_length), config)


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: Sequence[int], new_tokens: int,
                        max_length: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """The ``new_tokens`` most likely next tokens, one at a time (deterministic)."""
    if not prompt:
        raise AttributionError("greedy continuation needs at least one prompt token")
    ids = list(prompt)
    stops = set(stop_ids)
    model.eval()
    for _ in range(new_tokens):
        x = torch.tensor([ids[-max_length:]], dtype=torch.long)
        out = model(x)
        logits = getattr(out, "logits", out)
        token = int(logits[0, -1].argmax())
        ids.append(token)
        if token in stops:
            break
    return ids[len(prompt):]
