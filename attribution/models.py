"""Built-in architectures: small models for demos, tests and benchmarks.

Every builder takes a ``seed`` and initialises deterministically without touching the global
random state of the caller: the same seed always gives bitwise the same weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from attribution.errors import AttributionError


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Run ``build`` with the CPU generator seeded, then restore the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp(
    in_features: int = 64,
    hidden: int | Sequence[int] = 128,
    num_classes: int = 10,
    seed: int = 0,
) -> nn.Sequential:
    """Multi-layer perceptron Linear–ReLU–…–Linear; ``hidden`` is one width or a list of widths."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths or any(int(w) < 1 for w in widths):
        raise AttributionError(f"hidden must be a positive width or a list of them, got {hidden}")

    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, int(width)), nn.ReLU()]
            previous = int(width)
        layers.append(nn.Linear(previous, num_classes))
        return nn.Sequential(*layers)

    return _seeded(seed, build)  # type: ignore[return-value]


def logistic_regression(
    in_features: int = 64, num_classes: int = 10, seed: int = 0
) -> nn.Sequential:
    """Multinomial logistic regression: one Linear layer producing logits z = Wx + b."""
    return _seeded(seed, lambda: nn.Sequential(nn.Linear(in_features, num_classes)))  # type: ignore[return-value]


class ToImage(nn.Module):
    """Reshape ``(N, C·S·S)`` or ``(N, C, S, S)`` inputs to ``(N, C, S, S)`` images."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.channels, self.size, self.size)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 8,
    channels: int = 16,
    seed: int = 0,
) -> nn.Sequential:
    """Conv2d(3×3, same padding)–ReLU–flatten–Linear; accepts flat digits (N, 64) or (N, 1, 8, 8)."""

    def build() -> nn.Sequential:
        return nn.Sequential(
            ToImage(in_channels, image_size),
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * image_size * image_size, num_classes),
        )

    return _seeded(seed, build)  # type: ignore[return-value]


def tiny_gpt2(
    vocab_size: int = 256,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 128,
    seed: int = 0,
) -> nn.Module:
    """A small Hugging Face ``GPT2LMHeadModel`` built from a config (nothing is downloaded).

    Dropout is off so outputs, and hence gradients, are deterministic; the BOS/EOS id is the
    last token of the vocabulary.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise AttributionError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config).eval())


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "logistic_regression": logistic_regression,
    "small_cnn": small_cnn,
    "tiny_gpt2": tiny_gpt2,
}


def build(name: str, **config: object) -> nn.Module:
    """Build the built-in architecture ``name`` (``-`` and ``_`` are interchangeable)."""
    key = name.strip().lower().replace("-", "_")
    if key not in ARCHITECTURES:
        raise AttributionError(
            f"unknown architecture {name!r}; the built-in ones are {sorted(ARCHITECTURES)}"
        )
    builder = ARCHITECTURES[key]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise AttributionError(
            f"architecture {key!r} does not take {unknown}; its arguments are {list(accepted)}"
        )
    return builder(**config)
