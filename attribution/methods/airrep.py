"""AirRep: a trained encoder whose inner products predict data influence (Sun et al., NeurIPS 2025).

* **Encoder** ``enc``: an MLP ``input (+ one-hot label) → hidden → ReLU → hidden → ReLU → dim``
  (a final linear projection); scores are raw, unnormalised inner products
  ``score(test, train_i) = ⟨enc(test), enc(train_i)⟩``, so single-example top-k is plain
  inner-product search in the same index format as every other method.
* **Label conditioning** (default on for classification): the one-hot label is concatenated to the
  flattened input, on both the train and the query side, because influence depends on the label
  (a training example helps test examples of its own class and hurts others). Turn it off with
  ``label_conditioned=False`` to embed inputs only.
* **Group score** of a training group with embeddings eᵢ for a query q: sᵢ = ⟨q, eᵢ⟩,
  aᵢ = softmax_i(|sᵢ|), score = Σᵢ aᵢ sᵢ (:func:`group_score`); one member gives sᵢ.
* **Supervision by retraining** on a *dev* split (never the test split): the same
  :class:`~attribution.evaluate.SubsetResults` LDS evaluation uses, with the dev set in the
  place of the test set. Target for (subset k, dev example j): t_kj = (μ_j − L_kj)/σ_j clipped to
  [−10, 10] (:func:`subset_targets`), μ_j, σ_j over subsets.
* **Objective**: per dev example, a pairwise RankNet loss over the subsets of a step — for every
  pair with t_a > t_b, softplus(−(score_a − score_b)) weighted by min(t_a − t_b, cap)
  (:func:`ranknet_loss`) — with the predicted subset score the group score of the subset.
  Adam, ``steps`` steps, everything seeded by ``seed``.

Trained encoders are saved as ``.safetensors`` with a JSON manifest of how they were trained
(:meth:`AirRep.save` / :meth:`AirRep.load`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from attribution.data import Examples
from attribution.errors import AttributionError
from attribution.methods.base import Method, MethodArguments
from attribution.tasks import ClassificationTask, Measurement, Task

TARGET_CLIP = 10.0


# --- the group score ----------------------------------------------------------------------------
def group_score(query: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Attention-pooled score of a group: Σᵢ softmax(|s|)ᵢ sᵢ with sᵢ = ⟨q, eᵢ⟩.

    ``query`` is one embedding ``(d,)`` (→ a scalar) or several ``(m, d)`` (→ ``(m,)``);
    ``members`` are the group's embeddings ``(g, d)``, g ≥ 1. A one-member group scores sᵢ.
    """
    query = torch.as_tensor(query)
    members = torch.as_tensor(members)
    if members.ndim != 2:
        raise AttributionError(
            f"group members must be a 2-D (g, d) matrix of embeddings, got shape {tuple(members.shape)}"
        )
    if members.shape[0] == 0:
        raise AttributionError("the group is empty: name at least one training example")
    if query.ndim not in (1, 2):
        raise AttributionError(f"query must be (d,) or (m, d), got shape {tuple(query.shape)}")
    if query.shape[-1] != members.shape[1]:
        raise AttributionError(
            f"query embeddings have dimension {query.shape[-1]} but the group's have "
            f"{members.shape[1]}: they must come from the same encoder"
        )
    dtype = torch.promote_types(query.dtype, members.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    s = query.to(dtype) @ members.to(dtype).T  # (g,) or (m, g)
    weights = torch.softmax(s.abs(), dim=-1)
    return (weights * s).sum(-1)


def _masked_group_scores(
    dev: torch.Tensor, train: torch.Tensor, masks: torch.Tensor, pooling: str = "attention"
) -> torch.Tensor:
    """Group scores of every (subset k, dev example j): (K, J) from masks (K, n) bool.

    ``pooling="attention"``: :func:`group_score`; ``"mean"``: the mean inner product over the
    subset (the additive prediction LDS uses, divided by the subset size).
    """
    s = dev @ train.T  # (J, n)
    if pooling == "mean":
        weights = masks.to(s.dtype)
        return (weights @ s.T) / weights.sum(1, keepdim=True).clamp(min=1)
    logits = s.abs().unsqueeze(0).expand(masks.shape[0], -1, -1)
    logits = logits.masked_fill(~masks.unsqueeze(1), float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # (K, J, n)
    return (weights * s.unsqueeze(0)).sum(-1)


# --- targets and loss ---------------------------------------------------------------------------
def subset_targets(losses: np.ndarray | torch.Tensor, clip: float = TARGET_CLIP) -> np.ndarray:
    """t[k, j] = (μ_j − L[k, j]) / σ_j clipped to [−clip, clip]; μ, σ over subsets k.

    High target = low dev loss = the subset helped. Dev examples whose loss does not vary get 0.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] < 2:
        raise AttributionError(
            f"losses must be (subsets ≥ 2, dev examples), got shape {losses.shape}"
        )
    mean = losses.mean(axis=0)
    std = losses.std(axis=0)
    safe = np.where(std > 1e-12, std, 1.0)
    targets = np.where(std > 1e-12, (mean - losses) / safe, 0.0)
    return np.clip(targets, -clip, clip)


def ranknet_loss(scores: torch.Tensor, targets: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """Pairwise RankNet loss over subsets (rows) for each dev example (column).

    For every pair (a, b) with t_a > t_b in a column: w·softplus(−(s_a − s_b)),
    w = min(t_a − t_b, cap); the weighted mean over all such pairs (0 when there are none).
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise AttributionError(
            f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must be the same (K, J)"
        )
    ds = scores.unsqueeze(1) - scores.unsqueeze(0)  # (K, K, J): s_a − s_b
    dt = targets.unsqueeze(1) - targets.unsqueeze(0)
    weight = torch.where(dt > 0, dt.clamp(max=cap), torch.zeros_like(dt))
    total = weight.sum()
    if total <= 0:
        return scores.sum() * 0.0
    return (weight * nn.functional.softplus(-ds)).sum() / total


# --- the encoder ---------------------------------------------------------------------------------
class AirRepEncoder(nn.Module):
    """MLP encoder: flattened input (+ one-hot label) → hidden → hidden → linear projection to dim."""

    def __init__(
        self,
        in_features: int,
        dim: int = 64,
        hidden: int = 128,
        num_classes: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if in_features < 1 or dim < 1 or hidden < 1 or num_classes < 0:
            raise AttributionError(
                f"encoder sizes must be positive: in_features={in_features}, dim={dim}, "
                f"hidden={hidden}, num_classes={num_classes}"
            )
        self.in_features, self.dim, self.hidden, self.num_classes = (
            in_features,
            dim,
            hidden,
            num_classes,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Linear(in_features + num_classes, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
            )
            self.projection = nn.Linear(hidden, dim)

    def config(self) -> dict[str, int]:
        return {
            "in_features": self.in_features,
            "dim": self.dim,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
        }

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        if flat.shape[1] != self.in_features:
            raise AttributionError(
                f"the encoder takes {self.in_features} input features but got {flat.shape[1]} "
                f"(inputs of shape {tuple(x.shape)})"
            )
        if self.num_classes:
            if y is None:
                raise AttributionError("this encoder is label-conditioned: it needs the labels")
            if (
                y.ndim != 1
                or y.is_floating_point()
                or int(y.min()) < 0
                or int(y.max()) >= self.num_classes
            ):
                raise AttributionError(
                    f"labels must be integer classes in [0, {self.num_classes - 1}]"
                )
            onehot = nn.functional.one_hot(y.long(), self.num_classes).to(flat.dtype)
            flat = torch.cat([flat, onehot], dim=1)
        return self.projection(self.body(flat))


# --- the method ----------------------------------------------------------------------------------
@dataclasses.dataclass
class AirRepArguments(MethodArguments):
    """AirRep's knobs: encoder shape and the training recipe."""

    dim: int = 64
    hidden: int = 128
    label_conditioned: bool = True  # concat one-hot labels (classification tasks only)
    steps: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    subsets_per_step: int = 32  # subsets ranked against each other in one step
    dev_per_step: int = 64  # dev examples per step
    weight_cap: float = 1.0  # cap on |t_a − t_b| as a pair weight
    pooling: str = "attention"  # subset score in training: "attention" (the paper) or "mean"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for name in ("dim", "hidden", "steps", "dev_per_step"):
            if getattr(self, name) < 1:
                raise AttributionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.subsets_per_step < 2:
            raise AttributionError(
                f"subsets_per_step must be at least 2 (pairs of subsets), got {self.subsets_per_step}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise AttributionError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.pooling not in ("attention", "mean"):
            raise AttributionError(f"pooling must be 'attention' or 'mean', not {self.pooling!r}")
        if not (math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise AttributionError(f"weight_cap must be positive, got {self.weight_cap}")


class AirRep(Method):
    """Learned representations: ``train_vectors = enc(train)``, ``query_vectors = enc(test)``.

    ``AirRep(task, subsets=results, dev=dev_set)`` trains the encoder in :meth:`fit` from subset
    retraining on the dev split (``results.masks`` index the train set given to ``fit``,
    ``results.losses`` are the dev losses); ``AirRep(task, encoder=...)`` uses a trained encoder
    (an :class:`AirRepEncoder`, or the path of a ``.safetensors`` written by :meth:`save`).
    Without either, the encoder is the seeded, untrained one (a baseline).
    """

    name: ClassVar[str] = "airrep"
    arguments_class: ClassVar[type[MethodArguments]] = AirRepArguments

    def __init__(
        self,
        task: Task,
        device: str | torch.device | None = None,
        encoder: AirRepEncoder | str | Path | None = None,
        subsets: Any = None,
        dev: object = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task, device, **kwargs)
        self.args: AirRepArguments
        if (subsets is None) != (dev is None):
            raise AttributionError(
                "training AirRep needs both subsets (SubsetResults on the dev split) and dev"
            )
        self.subsets = subsets
        self.dev = self._examples(dev, "dev") if dev is not None else None
        self.history: list[float] = []
        self.training_info: dict[str, Any] = {}
        self.encoder: AirRepEncoder | None = None
        if isinstance(encoder, str | Path):
            encoder, info = _read_encoder(Path(encoder))
            self.training_info = info
        if encoder is not None:
            if not isinstance(encoder, AirRepEncoder):
                raise AttributionError(
                    f"encoder must be an AirRepEncoder or a .safetensors path, not {type(encoder).__name__}"
                )
            if encoder.dim != self.args.dim and "dim" in kwargs:
                raise AttributionError(
                    f"the encoder's dimension is {encoder.dim} but dim={self.args.dim} was asked for"
                )
            self.args.dim, self.args.hidden = encoder.dim, encoder.hidden
            self.args.label_conditioned = encoder.num_classes > 0
            self.encoder = encoder.to(self.device)

    # --- the encoder ---------------------------------------------------------------------------
    def _num_classes(self, examples: Examples) -> int:
        if not self.args.label_conditioned:
            return 0
        if not isinstance(self.task, ClassificationTask):
            raise AttributionError(
                "label_conditioned=True needs a classification task; pass label_conditioned=False"
            )
        with torch.no_grad():
            out = self.task.checked_forward(examples.x[:1].to(self.device))
        return int(out.shape[-1])

    def _ensure_encoder(self, examples: Examples) -> AirRepEncoder:
        if self.encoder is None:
            in_features = int(np.prod(examples.x.shape[1:]))
            self.encoder = AirRepEncoder(
                in_features,
                self.args.dim,
                self.args.hidden,
                self._num_classes(examples),
                seed=self.args.seed,
            ).to(self.device)
        return self.encoder

    def _embed(self, examples: Examples, grad: bool = False) -> torch.Tensor:
        encoder = self._ensure_encoder(examples)
        parts = []
        with torch.set_grad_enabled(grad):
            for x, y in examples.batches(self.args.batch_size if not grad else len(examples)):
                labels = y.to(self.device) if encoder.num_classes else None
                parts.append(encoder(x.to(self.device), labels))
        return torch.cat(parts)

    # --- training ------------------------------------------------------------------------------
    def train_encoder(self, train: Examples) -> list[float]:
        """Fit the encoder on the subsets' dev losses with the RankNet objective; the loss per step."""
        from attribution.evaluate import SubsetResults

        results = self.subsets
        if not isinstance(results, SubsetResults):
            raise AttributionError(
                f"subsets must be SubsetResults (from retrain_on_subsets), not {type(results).__name__}"
            )
        assert self.dev is not None
        if results.masks.shape[1] != len(train):
            raise AttributionError(
                f"the subsets cover {results.masks.shape[1]} training examples but fit got {len(train)}"
            )
        if results.losses.shape[1] != len(self.dev):
            raise AttributionError(
                f"the subsets hold losses of {results.losses.shape[1]} dev examples but dev has {len(self.dev)}"
            )
        if len(results) < 2:
            raise AttributionError("training AirRep needs at least 2 subsets")
        args = self.args
        encoder = self._ensure_encoder(train)
        targets = torch.as_tensor(subset_targets(results.losses), dtype=torch.float32)
        masks = torch.as_tensor(results.masks)
        rng = np.random.default_rng(args.seed)
        optimizer = torch.optim.Adam(
            encoder.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        n_sub, n_dev = masks.shape[0], len(self.dev)
        history = []
        start = time.perf_counter()
        encoder.train()
        for _ in range(args.steps):
            ks = rng.choice(n_sub, size=min(args.subsets_per_step, n_sub), replace=False)
            js = rng.choice(n_dev, size=min(args.dev_per_step, n_dev), replace=False)
            members = masks[ks].any(0)  # encode only the training examples some subset uses
            used = torch.nonzero(members).squeeze(1)
            train_emb = self._embed(train.subset(used), grad=True)
            dev_emb = self._embed(self.dev.subset(js), grad=True)
            scores = _masked_group_scores(
                dev_emb, train_emb, masks[ks][:, used].to(self.device), args.pooling
            )
            loss = ranknet_loss(scores, targets[ks][:, js].to(self.device), args.weight_cap)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
        encoder.eval()
        self.history = history
        self.training_info = {
            "trained": True,
            "steps": args.steps,
            "n_subsets": int(n_sub),
            "n_dev": int(n_dev),
            "n_train": len(train),
            "subsets_meta": results.meta,
            "first_loss": history[0],
            "final_loss": history[-1],
            "seconds": round(time.perf_counter() - start, 3),
            "arguments": self.arguments(),
        }
        return history

    def ranking_loss(self, train: object) -> float:
        """RankNet loss of the current encoder over *all* subsets and dev examples (evaluation)."""
        if self.subsets is None or self.dev is None:
            raise AttributionError("ranking_loss needs subsets and dev")
        examples = self._examples(train, "train")
        with torch.no_grad():
            scores = _masked_group_scores(
                self._embed(self.dev),
                self._embed(examples),
                torch.as_tensor(self.subsets.masks),
                self.args.pooling,
            )
            targets = torch.as_tensor(subset_targets(self.subsets.losses), dtype=torch.float32)
            return float(ranknet_loss(scores, targets, self.args.weight_cap))

    # --- Method interface ----------------------------------------------------------------------
    def prepare(self, examples: Examples) -> None:
        if self.subsets is not None and not self.training_info.get("trained"):
            self.train_encoder(examples)
        self._ensure_encoder(examples)
        self._state_ready = True

    def featurize_train(self, examples: Examples) -> np.ndarray:
        return self._embed(examples).cpu().numpy()

    def _query(self, examples: Examples, measurement: Measurement) -> np.ndarray:
        if self.encoder is None:
            raise AttributionError("AirRep has no encoder yet: call fit(train) or pass encoder=")
        return self._embed(examples).cpu().numpy()

    def group_score(self, test: object, ids: object) -> np.ndarray:
        """Attention-pooled score of the training group ``ids`` (positions in the fitted train
        set) for each test example: (n_test,)."""
        index = np.asarray(ids).reshape(-1)
        n = len(self.train_vectors())
        if index.size == 0:
            raise AttributionError("the group is empty: name at least one training example")
        if not np.issubdtype(index.dtype, np.integer):
            raise AttributionError(f"group ids must be integers, got dtype {index.dtype}")
        if index.min() < 0 or index.max() >= n:
            bad = index[(index < 0) | (index >= n)]
            raise AttributionError(
                f"group ids {bad[:5].tolist()} are not in the corpus of {n} training examples"
            )
        queries = torch.from_numpy(self.query_vectors(test))
        members = torch.from_numpy(self.train_vectors()[index].astype(np.float32))
        return group_score(queries, members).numpy()

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.encoder is None:
            raise AttributionError("AirRep has no encoder yet: call fit(train) first")
        state = {
            f"encoder.{k}": v.detach().cpu().numpy() for k, v in self.encoder.state_dict().items()
        }
        cfg = self.encoder.config()
        state["encoder_config"] = np.array(
            [cfg["in_features"], cfg["dim"], cfg["hidden"], cfg["num_classes"]], dtype=np.int64
        )
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "encoder_config" not in state:
            raise AttributionError("not an AirRep state: it lacks 'encoder_config'")
        in_features, dim, hidden, num_classes = (int(v) for v in state["encoder_config"])
        if self._train is not None and self._train.shape[1] != dim:
            raise AttributionError(
                f"the encoder's dimension {dim} does not match the index's {self._train.shape[1]}"
            )
        encoder = AirRepEncoder(in_features, dim, hidden, num_classes)
        weights = {
            k[len("encoder.") :]: torch.from_numpy(np.asarray(v))
            for k, v in state.items()
            if k.startswith("encoder.")
        }
        try:
            encoder.load_state_dict(weights)
        except RuntimeError as err:
            raise AttributionError(f"the AirRep state does not fit its encoder: {err}") from err
        self.encoder = encoder.to(self.device).eval()
        self.args.dim, self.args.hidden = dim, hidden
        self.args.label_conditioned = num_classes > 0
        self._state_ready = True

    def check_index(self, train_vectors: np.ndarray) -> None:
        """Raise when stored train vectors were not made by an encoder of this dimension."""
        if self.encoder is None:
            raise AttributionError("AirRep has no encoder yet")
        if train_vectors.ndim != 2 or train_vectors.shape[1] != self.encoder.dim:
            raise AttributionError(
                f"the encoder's dimension {self.encoder.dim} does not match the index's "
                f"vectors of shape {train_vectors.shape}"
            )

    def use_index(self, train_vectors: np.ndarray) -> AirRep:
        """Serve from stored train vectors (checked against the encoder's dimension)."""
        vectors = np.asarray(train_vectors)
        self.check_index(vectors)
        self._train, self.n_train = vectors, int(vectors.shape[0])
        return self

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the encoder to ``path`` (.safetensors) and its manifest to ``path`` + ``.json``."""
        from safetensors.torch import save_file

        if self.encoder is None:
            raise AttributionError("AirRep has no encoder to save: call fit(train) first")
        path = Path(path)
        if path.suffix != ".safetensors":
            raise AttributionError(f"save the encoder as a .safetensors file, not {path.name}")
        weights = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(weights, str(path))
        manifest = {
            "method": "airrep",
            "encoder": self.encoder.config(),
            "training": self.training_info or {"trained": False},
            "arguments": self.arguments(),
        }
        _manifest_path(path).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(
        cls, path: str | Path, task: Task, device: str | torch.device | None = None, **kwargs: Any
    ) -> AirRep:
        """An AirRep with the encoder written by :meth:`save` (call ``fit(train)`` to embed)."""
        return cls(task, device, encoder=Path(path), **kwargs)


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_encoder(path: Path) -> tuple[AirRepEncoder, dict]:
    from attribution.checkpoints import load_safetensors

    manifest_path = _manifest_path(path)
    if not manifest_path.is_file():
        raise AttributionError(f"the encoder {path} has no manifest {manifest_path.name}")
    try:
        manifest = json.loads(manifest_path.read_text())
        config = manifest["encoder"]
        encoder = AirRepEncoder(
            int(config["in_features"]),
            int(config["dim"]),
            int(config["hidden"]),
            int(config["num_classes"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise AttributionError(f"{manifest_path} is not an AirRep manifest: {err}") from err
    weights = load_safetensors(path)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:
        raise AttributionError(
            f"{path} does not match the encoder its manifest describes: {err}"
        ) from err
    return encoder.eval(), dict(manifest.get("training", {}))


__all__ = [
    "AirRep",
    "AirRepArguments",
    "AirRepEncoder",
    "group_score",
    "ranknet_loss",
    "subset_targets",
]
