"""Model cards: a small YAML/JSON file that says how to rebuild a model and its checkpoints.

```yaml
task: classification            # classification | regression | causal-lm
architecture:
  builtin: mlp                  # or  huggingface: ./hf-dir   or  entry_point: my-arch
  config: {in_features: 64, hidden: 128, num_classes: 10}
checkpoints:                    # .safetensors only; paths relative to this file
  - {path: ckpt-0.safetensors, learning_rate: 0.1, step: 100}
input_shape: [1, 8, 8]          # optional: reshape each flat feature row to this
```

Every problem is reported at once, by field. Paths are resolved against the card's directory
and confined to the data root.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from indexer.errors import CardError, IndexerError
from indexer.paths import confine, sha256_file

TaskKind = Literal["classification", "regression", "causal-lm"]
ENTRY_POINT_GROUP = "tdaserve.architectures"
_REGISTRY: dict[str, Callable[..., Any] | str] = {}


class Architecture(BaseModel):
    """Exactly one of: a built-in name, a local Hugging Face directory, a registered entry point."""

    model_config = ConfigDict(extra="forbid")
    builtin: str | None = None
    huggingface: str | None = None
    entry_point: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> Architecture:
        chosen = [k for k in ("builtin", "huggingface", "entry_point") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError(
                "give exactly one of 'builtin', 'huggingface' or 'entry_point'"
                + (f" (got {chosen})" if chosen else "")
            )
        if self.huggingface and self.config:
            raise ValueError("'config' is read from the Hugging Face directory; remove it")
        return self


class CheckpointSpec(BaseModel):
    """One weights file with what TracIn needs to know about it."""

    model_config = ConfigDict(extra="forbid")
    path: str
    learning_rate: float | None = Field(default=None, gt=0)
    step: int | None = Field(default=None, ge=0)


class ModelCard(BaseModel):
    """A validated model card; after :func:`load_card` every path in it is absolute."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    task: TaskKind
    architecture: Architecture
    checkpoints: list[CheckpointSpec] = Field(default_factory=list)
    input_shape: list[int] | None = None
    tokenizer: str | None = None
    max_length: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _checks(self) -> ModelCard:
        if not self.checkpoints and not self.architecture.huggingface:
            raise ValueError("at least one checkpoint is needed (its weights are the model)")
        lrs = [c.learning_rate is None for c in self.checkpoints]
        if any(lrs) and not all(lrs):
            raise ValueError("give a learning_rate for every checkpoint or for none")
        if self.input_shape is not None and any(s < 1 for s in self.input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
        return self

    def learning_rates(self) -> list[float] | None:
        """Per-checkpoint learning rates, or None when the card gives none."""
        if not self.checkpoints or self.checkpoints[0].learning_rate is None:
            return None
        return [float(c.learning_rate) for c in self.checkpoints]  # type: ignore[arg-type]


# --- loading ------------------------------------------------------------------------------
def parse_card(text: str, source: str = "<card>") -> ModelCard:
    """Validate card text (YAML or JSON); raise :class:`CardError` listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CardError(source, [f"not valid YAML/JSON: {err}"]) from err
    if not isinstance(data, dict):
        raise CardError(source, ["the card must be a mapping of fields (task, architecture, ...)"])
    try:
        return ModelCard.model_validate(data)
    except ValidationError as err:
        raise CardError(source, [_describe(e) for e in err.errors()]) from None


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "card"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def load_card(path: str | os.PathLike[str], data_root: Path | None = None) -> ModelCard:
    """Read and validate a card file; resolve its paths (confined to ``data_root``).

    Relative checkpoint, Hugging Face and tokenizer paths are taken relative to the card's
    directory. Missing files, non-safetensors checkpoints and paths outside the data root are
    reported by field together with the schema problems.
    """
    card_path = confine(path, data_root, what="model card")
    if not card_path.is_file():
        raise IndexerError(f"model card {path} not found (looked at {card_path})")
    try:
        text = card_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CardError(str(path), [f"not UTF-8 text (a card is YAML or JSON): {err}"]) from err
    card = parse_card(text, str(path))
    return resolve_paths(card, card_path.parent, data_root, str(path))


def tokenizer_dir(card: ModelCard) -> str | None:
    """Where the card's tokenizer lives: ``tokenizer``, else the Hugging Face model directory."""
    return card.tokenizer or card.architecture.huggingface


def pad_token_id(card: ModelCard) -> int:
    """The id token inputs are padded with: a Hugging Face model's ``pad_token_id`` (its
    classifier pools the last non-pad token, so padding must use it), else 0."""
    if card.architecture.huggingface:
        try:
            config = json.loads((Path(card.architecture.huggingface) / "config.json").read_text())
        except (OSError, ValueError):
            return 0
        value = config.get("pad_token_id") if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def resolve_paths(card: ModelCard, base: Path, data_root: Path | None, source: str) -> ModelCard:
    """Return a copy of ``card`` with absolute, checked paths; raise :class:`CardError`."""
    problems: list[str] = []
    card = card.model_copy(deep=True)

    def resolve(value: str, field: str) -> Path | None:
        try:
            return confine(value, data_root, base=base, what=field)
        except IndexerError as err:
            problems.append(f"{field}: {err}")
            return None

    for i, spec in enumerate(card.checkpoints):
        field = f"checkpoints.{i}.path"
        resolved = resolve(spec.path, field)
        if resolved is None:
            continue
        if resolved.suffix != ".safetensors":
            problems.append(
                f"{field}: {spec.path} is not a .safetensors file; pickle formats (.pt, .bin, "
                ".ckpt) are refused. Convert with safetensors.torch.save_file(state_dict, path)"
            )
        elif not resolved.is_file():
            problems.append(f"{field}: file {resolved} does not exist")
        spec.path = str(resolved)
    if card.architecture.huggingface:
        resolved = resolve(card.architecture.huggingface, "architecture.huggingface")
        if resolved is not None:
            if not (resolved / "config.json").is_file():
                problems.append(
                    f"architecture.huggingface: {resolved} is not a local Hugging Face model "
                    "directory (no config.json); models are never downloaded"
                )
            card.architecture.huggingface = str(resolved)
    if card.tokenizer:
        resolved = resolve(card.tokenizer, "tokenizer")
        if resolved is not None:
            if not resolved.is_dir():
                problems.append(f"tokenizer: {resolved} is not a directory")
            card.tokenizer = str(resolved)
    if card.architecture.entry_point:
        try:
            _entry_point(card.architecture.entry_point)
        except IndexerError as err:
            problems.append(f"architecture.entry_point: {err}")
    if problems:
        raise CardError(source, problems)
    return card


# --- operator-registered architectures -------------------------------------------------------
def register_architecture(name: str, target: Callable[..., Any] | str) -> None:
    """Allow cards to use ``entry_point: name`` (target: a callable or ``"module:function"``).

    Operators can also register through the ``tdaserve.architectures`` entry-point group or the
    ``TDA_ARCHITECTURES`` environment variable (``name=module:function,...``). A card can never
    name an arbitrary importable function: unregistered names are refused.
    """
    _REGISTRY[name] = target


def registered_architectures() -> dict[str, Callable[..., Any] | str]:
    """Every entry point a card may name, from all three registration routes."""
    found: dict[str, Callable[..., Any] | str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    for item in filter(None, os.environ.get("TDA_ARCHITECTURES", "").split(",")):
        name, _, target = item.strip().partition("=")
        if target:
            found[name.strip()] = target.strip()
    found.update(_REGISTRY)
    return found


def _entry_point(name: str) -> Callable[..., Any]:
    registry = registered_architectures()
    target = registry.get(name)
    if target is None:  # a card may also spell out a registered "module:function" target
        target = next((t for t in registry.values() if t == name), None)
    if target is None:
        known = sorted(registry) or ["(none registered)"]
        raise IndexerError(
            f"{name!r} is not a registered architecture; known: {known}. An operator registers "
            "one with indexer.cards.register_architecture or TDA_ARCHITECTURES=name=module:function"
        )
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise IndexerError(f"registered architecture {name!r} ({target}) cannot be loaded: {err}") from err


# --- building the task -------------------------------------------------------------------------
def build_model(card: ModelCard) -> Any:
    """Instantiate the card's architecture (weights are loaded later from the checkpoints)."""
    arch = card.architecture
    if arch.builtin:
        try:
            from attribution import models
        except ImportError as err:
            raise IndexerError(f"built-in architectures are unavailable: {err}") from err
        try:
            return models.build(arch.builtin, **arch.config)
        except (KeyError, TypeError, ValueError) as err:
            raise CardError("architecture", [f"architecture.builtin {arch.builtin!r}: {err}"]) from err
    if arch.entry_point:
        try:
            return _entry_point(arch.entry_point)(**arch.config)
        except TypeError as err:
            raise CardError("architecture", [f"architecture.config: {err}"]) from err
    return _huggingface_model(card)


def _huggingface_model(card: ModelCard) -> Any:
    import transformers

    loader = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "regression": transformers.AutoModelForSequenceClassification,
    }[card.task]
    extra = {"num_labels": 1} if card.task == "regression" else {}
    try:  # local files and safetensors only: never download, never unpickle
        return loader.from_pretrained(
            card.architecture.huggingface, local_files_only=True, use_safetensors=True,
            trust_remote_code=False, **extra,
        )
    except (OSError, ValueError) as err:
        raise IndexerError(f"cannot load Hugging Face model {card.architecture.huggingface}: {err}") from err


def load_task(card: ModelCard) -> Any:
    """Build the engine ``Task`` the card describes: architecture, task kind and checkpoints."""
    from attribution.checkpoints import Checkpoint
    from attribution.tasks import CausalLMTask, ClassificationTask, RegressionTask

    task_class = {
        "classification": ClassificationTask,
        "regression": RegressionTask,
        "causal-lm": CausalLMTask,
    }[card.task]
    model = build_model(card)
    checkpoints = [
        Checkpoint(Path(c.path), c.learning_rate, c.step if c.step is not None else i)
        for i, c in enumerate(card.checkpoints)
    ]
    return task_class(model, checkpoints=checkpoints or None)


def model_fingerprint(card: ModelCard) -> dict[str, Any]:
    """sha256 of everything that defines the model: architecture, task, weights (not paths)."""
    checkpoints = [
        {"sha256": sha256_file(Path(c.path)), "learning_rate": c.learning_rate, "step": c.step,
         "path": c.path}
        for c in card.checkpoints
    ]
    weights: dict[str, str] = {}
    if card.architecture.huggingface:
        directory = Path(card.architecture.huggingface)
        for f in sorted(directory.glob("*.json")) + sorted(directory.glob("*.safetensors")):
            weights[f.name] = sha256_file(f)
    arch = card.architecture.model_dump(exclude={"huggingface"})
    identity = {
        "task": card.task,
        "architecture": arch,
        "huggingface_files": weights,
        "input_shape": card.input_shape,
        "checkpoints": [{k: c[k] for k in ("sha256", "learning_rate", "step")} for c in checkpoints],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "checkpoints": checkpoints, "huggingface_files": weights}
