"""AirRep: a trained encoder whose inner products predict data influence (Sun et al., NeurIPS 2025).

* **Encoder** ``enc`` (:mod:`attribution.encoders`): ``features="input"`` reads the input (an
  MLP, or one linear projection with ``hidden=0``, e.g. on frozen MiniLM sentence embeddings);
  ``features="model"`` reads the trained target model's own frozen representation (residual and
  penultimate activations, embedded as a K-FAC-whitened last-layer gradient) under a trainable
  per-direction scale (``layers`` > 1: the last few linear layers' gradients, block-diagonal
  K-FAC; ``ensemble`` > 1: several checkpoints' embeddings concatenated, scaled by 1/√C). Scores
  are raw, unnormalised inner products
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
  Adam, ``steps`` steps, everything seeded by ``seed``. With ``holdout`` > 0, a share of the
  subsets and dev examples is held out and the encoder with the best held-out LDS is kept.

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
from attribution.encoders import (
    FEATURES,
    AirRepEncoder,
    kfac_basis,
    model_blocks,
    model_inputs,
)
from attribution.errors import AttributionError
from attribution.files import atomic_write
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


# --- the method ----------------------------------------------------------------------------------
@dataclasses.dataclass
class AirRepArguments(MethodArguments):
    """AirRep's knobs: encoder shape and the training recipe."""

    dim: int = 64
    hidden: int = 128  # MLP width for features="input"; 0 = one linear projection
    features: str = "input"  # "input" (the raw input) or "model" (the target model's last layer)
    label_conditioned: bool = True  # concat one-hot labels (classification tasks only)
    checkpoint: int = -1  # features="model": which of the task's checkpoints (-1 = the last)
    ensemble: int = 1  # features="model": read this many checkpoints, ending at `checkpoint`
    layers: int = 1  # features="model": the last `layers` linear layers (0 = all of them)
    lambda_scale: float = 0.03  # features="model": λ of the K-FAC whitening (× mean eigenvalue)
    steps: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    subsets_per_step: int = 32  # subsets ranked against each other in one step
    dev_per_step: int = 64  # dev examples per step
    weight_cap: float = 1.0  # cap on |t_a − t_b| as a pair weight
    temperature: float = 1.0  # RankNet compares temperature × (s_a − s_b)
    pooling: str = "attention"  # subset score in training: "attention" (the paper) or "mean"
    holdout: float = 0.0  # fraction of subsets *and* dev examples kept for model selection
    eval_every: int = 25  # steps between held-out evaluations (when holdout > 0)
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for name in ("dim", "steps", "dev_per_step", "eval_every"):
            if getattr(self, name) < 1:
                raise AttributionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden < 0:
            raise AttributionError(f"hidden must be 0 (linear) or positive, got {self.hidden}")
        if self.layers < 0 or self.ensemble < 1:
            raise AttributionError(
                f"layers must be ≥ 0 (0 = all) and ensemble ≥ 1, got {self.layers}, {self.ensemble}"
            )
        if self.dim % self.ensemble:
            raise AttributionError(
                f"dim={self.dim} must be a multiple of ensemble={self.ensemble} (dim / ensemble "
                "directions per checkpoint)"
            )
        if self.features not in FEATURES:
            raise AttributionError(f"features must be 'input' or 'model', not {self.features!r}")
        if self.subsets_per_step < 2:
            raise AttributionError(
                f"subsets_per_step must be at least 2 (pairs of subsets), got {self.subsets_per_step}"
            )
        for name in ("learning_rate", "lambda_scale", "weight_cap", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise AttributionError(f"{name} must be positive, got {value}")
        if self.pooling not in ("attention", "mean"):
            raise AttributionError(f"pooling must be 'attention' or 'mean', not {self.pooling!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise AttributionError(f"holdout must lie in [0, 1), got {self.holdout}")


class AirRep(Method):
    """Learned representations: ``train_vectors = enc(train)``, ``query_vectors = enc(test)``.

    ``AirRep(task, subsets=results, dev=dev_set)`` trains the encoder in :meth:`fit` from subset
    retraining on the dev split (``results.masks`` index the train set given to ``fit``,
    ``results.losses`` are the dev losses); ``AirRep(task, encoder=...)`` uses a trained encoder
    (an :class:`AirRepEncoder`, or the path of a ``.safetensors`` written by :meth:`save`).
    Without either, the encoder is the seeded, untrained one (a baseline; with
    ``features="model"`` the K-FAC-whitened last-layer gradient similarity).
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
            encoder, manifest = _read_encoder(Path(encoder))
            self.training_info = dict(manifest.get("training", {}))
            self.args.checkpoint = int(manifest.get("arguments", {}).get("checkpoint", -1))
        if encoder is not None:
            if not isinstance(encoder, AirRepEncoder):
                raise AttributionError(
                    f"encoder must be an AirRepEncoder or a .safetensors path, not {type(encoder).__name__}"
                )
            if encoder.dim != self.args.dim and "dim" in kwargs:
                raise AttributionError(
                    f"the encoder's dimension is {encoder.dim} but dim={self.args.dim} was asked for"
                )
            self._adopt(encoder)

    def _adopt(self, encoder: AirRepEncoder) -> None:
        """Use ``encoder`` and make the arguments describe it."""
        self.args.dim, self.args.hidden = encoder.dim, encoder.hidden
        self.args.features = encoder.features
        self.args.label_conditioned = encoder.num_classes > 0
        if encoder.features == "model":
            self.args.ensemble = encoder.members
            self.args.layers = len(encoder.blocks) // encoder.members
        self.encoder = encoder.to(self.device).eval()
        self._state_ready = True

    # --- the encoder ---------------------------------------------------------------------------
    def _num_classes(self, examples: Examples) -> int:
        if not self.args.label_conditioned or self.args.features == "model":
            return 0
        if not isinstance(self.task, ClassificationTask):
            raise AttributionError(
                "label_conditioned=True needs a classification task; pass label_conditioned=False"
            )
        with torch.no_grad():
            out = self.task.checked_forward(examples.x[:1].to(self.device))
        return int(out.shape[-1])

    def _inputs(self, examples: Examples) -> torch.Tensor:
        """What the encoder reads: the input itself, or the frozen model features (n, F)."""
        if self.args.features == "input":
            return examples.x.to(self.device)
        if not isinstance(self.task, ClassificationTask):
            raise AttributionError("features='model' needs a classification task")
        columns = []
        with self.task.lock:
            for index in self._checkpoints():
                self.task.load_checkpoint(index)
                parts = [
                    model_inputs(
                        self.task.model, x.to(self.device), y.to(self.device), self.args.layers
                    )
                    for x, y in examples.batches(self.args.batch_size)
                ]
                columns.append(torch.cat(parts))
        return torch.cat(columns, dim=1)

    def _checkpoints(self) -> list[int]:
        """The checkpoints a ``"model"`` encoder reads: ``ensemble`` of them ending at
        ``checkpoint``."""
        count, args = len(self.task.checkpoints), self.args
        index = args.checkpoint if args.checkpoint >= 0 else count + args.checkpoint
        if not 0 <= index < count:
            raise AttributionError(
                f"checkpoint {args.checkpoint} is not one of the task's {count} checkpoints"
            )
        if index + 1 < args.ensemble:
            raise AttributionError(
                f"ensemble={args.ensemble} needs {args.ensemble} checkpoints up to checkpoint "
                f"{index}, but the task has only {index + 1} there"
            )
        return list(range(index + 1 - args.ensemble, index + 1))

    def _ensure_encoder(self, examples: Examples) -> AirRepEncoder:
        if self.encoder is None:
            args = self.args
            inputs = self._inputs(examples) if args.features == "model" else examples.x
            blocks = (
                model_blocks(self.task.model, args.layers) * args.ensemble
                if args.features == "model"
                else None
            )
            encoder = AirRepEncoder(
                int(np.prod(inputs.shape[1:])),
                args.dim,
                args.hidden,
                self._num_classes(examples),
                seed=args.seed,
                features=args.features,
                outputs=blocks[0][0] if blocks else 0,
                blocks=blocks,
                members=args.ensemble if blocks else 1,
            )
            if blocks:
                buffers = kfac_basis(
                    inputs.cpu(), blocks, args.dim, args.lambda_scale, args.ensemble
                )
                for name, value in buffers.items():
                    getattr(encoder, name).copy_(value)
            self.encoder = encoder.to(self.device)
        return self.encoder

    def _prefix(self, examples: Examples) -> torch.Tensor:
        """The encoder's frozen part for every example (computed once, without gradients)."""
        encoder = self._ensure_encoder(examples)
        inputs = self._inputs(examples)
        labels = examples.y.to(self.device) if encoder.num_classes else None
        with torch.no_grad():
            return encoder.prefix(inputs, labels)

    def _embed(self, examples: Examples) -> torch.Tensor:
        encoder = self._ensure_encoder(examples)
        parts = []
        with torch.no_grad():
            prefix = self._prefix(examples)
            for start in range(0, len(prefix), self.args.batch_size):
                parts.append(encoder.head(prefix[start : start + self.args.batch_size]))
        return torch.cat(parts)

    # --- training ------------------------------------------------------------------------------
    def _check_subsets(self, train: Examples) -> Any:
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
        return results

    def train_encoder(self, train: Examples) -> list[float]:
        """Fit the encoder on the subsets' dev losses with the RankNet objective; the loss per step.

        With ``holdout`` > 0 a fraction of the subsets and of the dev examples is kept out of
        training; every ``eval_every`` steps the LDS of the dev scores on those held-out subsets
        and examples is measured, and the encoder of the best evaluation (the initial one
        included) is kept.
        """
        from attribution.evaluate import lds

        results = self._check_subsets(train)
        args = self.args
        encoder = self._ensure_encoder(train)
        assert self.dev is not None
        targets = torch.as_tensor(subset_targets(results.losses), dtype=torch.float32)
        masks = torch.as_tensor(results.masks)
        rng = np.random.default_rng(args.seed)
        subs, held_subs = _split(rng, len(results), args.holdout)
        devs, held_devs = _split(rng, len(self.dev), args.holdout)
        train_in, dev_in = self._prefix(train), self._prefix(self.dev)

        def heldout_lds() -> float:
            with torch.no_grad():
                scores = encoder.head(dev_in[held_devs]) @ encoder.head(train_in).T
            outputs = results.outputs[np.ix_(held_subs, held_devs)]
            return lds(scores.cpu().numpy(), results.masks[held_subs], outputs).mean

        optimizer = torch.optim.Adam(
            [p for p in encoder.parameters() if p.requires_grad],
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
        )
        evaluate = args.holdout > 0 and len(held_subs) >= 3
        evaluations: list[tuple[int, float]] = []
        best = (heldout_lds(), 0, _copy_state(encoder)) if evaluate else None
        if best is not None:
            evaluations.append((0, best[0]))
        history = []
        start = time.perf_counter()
        encoder.train()
        for step in range(1, args.steps + 1):
            ks = rng.choice(subs, size=min(args.subsets_per_step, len(subs)), replace=False)
            js = rng.choice(devs, size=min(args.dev_per_step, len(devs)), replace=False)
            used = torch.nonzero(masks[ks].any(0)).squeeze(1)
            scores = _masked_group_scores(
                encoder.head(dev_in[js]),
                encoder.head(train_in[used.to(self.device)]),
                masks[ks][:, used].to(self.device),
                args.pooling,
            )
            loss = ranknet_loss(
                scores * args.temperature, targets[ks][:, js].to(self.device), args.weight_cap
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            if best is not None and (step % args.eval_every == 0 or step == args.steps):
                value = heldout_lds()
                evaluations.append((step, value))
                if value > best[0]:
                    best = (value, step, _copy_state(encoder))
        if best is not None:
            encoder.load_state_dict(best[2])
        encoder.eval()
        self.history = history
        self.training_info = {
            "trained": True,
            "steps": args.steps,
            "n_subsets": int(len(subs)),
            "n_dev": int(len(devs)),
            "n_train": len(train),
            "subsets_meta": results.meta,
            "first_loss": history[0],
            "final_loss": history[-1],
            "seconds": round(time.perf_counter() - start, 3),
            "arguments": self.arguments(),
        }
        if best is not None:
            self.training_info.update(
                heldout_subsets=int(len(held_subs)),
                heldout_dev=int(len(held_devs)),
                best_step=best[1],
                heldout_lds=[[s, round(v, 4)] for s, v in evaluations],
            )
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
            [
                cfg["in_features"],
                cfg["dim"],
                cfg["hidden"],
                cfg["num_classes"],
                FEATURES.index(self.encoder.features),
                self.args.checkpoint,
                cfg["outputs"],
            ],
            dtype=np.int64,
        )
        state["encoder_json"] = np.frombuffer(json.dumps(cfg).encode(), dtype=np.uint8).copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "encoder_config" not in state:
            raise AttributionError("not an AirRep state: it lacks 'encoder_config'")
        config = [int(v) for v in state["encoder_config"]]
        in_features, dim, hidden, num_classes = config[:4]
        features = FEATURES[config[4]] if len(config) > 4 else "input"
        outputs = config[6] if len(config) > 6 else 0
        if self._train is not None and self._train.shape[1] != dim:
            raise AttributionError(
                f"the encoder's dimension {dim} does not match the index's {self._train.shape[1]}"
            )
        if "encoder_json" in state:  # the full config (blocks of several layers / checkpoints)
            encoder = _encoder_from_config(json.loads(bytes(np.asarray(state["encoder_json"]))))
        else:
            encoder = AirRepEncoder(
                in_features, dim, hidden, num_classes, features=features, outputs=outputs
            )
        weights = {
            k[len("encoder.") :]: torch.from_numpy(np.asarray(v))
            for k, v in state.items()
            if k.startswith("encoder.")
        }
        try:
            encoder.load_state_dict(weights)
        except RuntimeError as err:
            raise AttributionError(f"the AirRep state does not fit its encoder: {err}") from err
        if len(config) > 5:
            self.args.checkpoint = config[5]
        self._adopt(encoder)

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
        from safetensors.torch import save

        if self.encoder is None:
            raise AttributionError("AirRep has no encoder to save: call fit(train) first")
        path = Path(path)
        if path.suffix != ".safetensors":
            raise AttributionError(f"save the encoder as a .safetensors file, not {path.name}")
        weights = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        manifest = {
            "method": "airrep",
            "encoder": self.encoder.config(),
            "training": self.training_info or {"trained": False},
            "arguments": self.arguments(),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        atomic_write(path, lambda handle: handle.write(save(weights)))
        atomic_write(_manifest_path(path), lambda handle: handle.write(text.encode()))
        return path

    @classmethod
    def load(
        cls, path: str | Path, task: Task, device: str | torch.device | None = None, **kwargs: Any
    ) -> AirRep:
        """An AirRep with the encoder written by :meth:`save` (call ``fit(train)`` to embed)."""
        return cls(task, device, encoder=Path(path), **kwargs)


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _split(rng: np.random.Generator, n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (kept, held-out) split of range(n); nothing held out when ``fraction`` is 0."""
    order = rng.permutation(n)
    held = int(round(fraction * n)) if fraction > 0 else 0
    held = min(held, n - 2)
    return np.sort(order[held:]), np.sort(order[:held])


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def read_manifest(path: str | Path) -> dict:
    """The JSON manifest written beside an encoder by :meth:`AirRep.save`."""
    manifest_path = _manifest_path(Path(path))
    if not manifest_path.is_file():
        raise AttributionError(f"the encoder {path} has no manifest {manifest_path.name}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise AttributionError(f"{manifest_path} is not an AirRep manifest: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("encoder"), dict):
        raise AttributionError(f"{manifest_path} is not an AirRep manifest: no 'encoder' entry")
    return manifest


def _encoder_from_config(
    config: Any, what: str = "the state has an encoder config"
) -> AirRepEncoder:
    try:
        return AirRepEncoder.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise AttributionError(f"{what} that is not AirRep's: {err}") from err


def _read_encoder(path: Path) -> tuple[AirRepEncoder, dict]:
    from attribution.checkpoints import load_safetensors

    manifest = read_manifest(path)
    encoder = _encoder_from_config(manifest["encoder"], f"{path} has a manifest")
    weights = load_safetensors(path)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:
        raise AttributionError(
            f"{path} does not match the encoder its manifest describes: {err}"
        ) from err
    return encoder.eval(), manifest


__all__ = [
    "AirRep",
    "AirRepArguments",
    "AirRepEncoder",
    "group_score",
    "ranknet_loss",
    "read_manifest",
    "subset_targets",
]
