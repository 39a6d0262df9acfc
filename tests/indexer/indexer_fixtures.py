"""Small real fixtures for indexer tests: a digits MLP trained here, its card and corpora."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from safetensors.torch import save_file

from attribution.data import Examples
from attribution.datasets import load_digits_split
from attribution.models import build
from attribution.tasks import ClassificationTask
from attribution.training import TrainConfig, train

HIDDEN = 32
TRAK_ARGS = {"proj_dim": 64}


@dataclass
class Setup:
    root: Path  # data root: card, checkpoints and corpora live here
    card: Path
    corpus: Path
    extra: Path  # 40 more records (ids "extra-*") for add tests
    train: Examples
    more: Examples
    test: Examples
    checkpoints: list[Path]


def corpus_table(examples: Examples, prefix: str) -> pa.Table:
    x = examples.x.numpy()
    n = len(x)
    return pa.table({
        "id": [f"{prefix}-{i:04d}" for i in range(n)],
        "features": pa.array(list(x), type=pa.list_(pa.float32())),
        "label": examples.y.numpy().astype(np.int64),
        "source": [f"digits/{prefix}/{i}" for i in range(n)],
        "license": ["bsd-3"] * n,
    })


def make_setup(root: Path, n_train: int = 240) -> Setup:
    """Train an MLP 64-32-10 for a moment, save 2 checkpoints, write card and corpora."""
    root.mkdir(parents=True, exist_ok=True)
    train_all, test = load_digits_split(n_train=n_train + 40, n_test=20, seed=0)
    trainset = Examples(train_all.x[:n_train], train_all.y[:n_train])
    more = Examples(train_all.x[n_train:], train_all.y[n_train:])
    model = build("mlp", hidden=HIDDEN, seed=0)
    result = train(model, ClassificationTask, trainset,
                   TrainConfig(epochs=40, learning_rate=1e-2, checkpoints=2))
    paths = []
    for i, ckpt in enumerate(result.checkpoints):
        path = root / "checkpoints" / f"ckpt-{i}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(path))
        paths.append(path)
    card = {
        "name": "digits-mlp",
        "task": "classification",
        "architecture": {"builtin": "mlp", "config": {"hidden": HIDDEN, "seed": 0}},
        "checkpoints": [
            {"path": f"checkpoints/{p.name}", "learning_rate": c.learning_rate, "step": c.step}
            for p, c in zip(paths, result.checkpoints, strict=True)
        ],
    }
    card_path = root / "model.yaml"
    card_path.write_text(yaml.safe_dump(card))
    corpus = root / "train.parquet"
    pq.write_table(corpus_table(trainset, "d"), corpus)
    extra = root / "more.parquet"
    pq.write_table(corpus_table(more, "extra"), extra)
    return Setup(root, card_path, corpus, extra, trainset, more, test, paths)


def engine_task(setup: Setup) -> ClassificationTask:
    """The same task the card describes (weights, learning rates), built directly with the engine."""
    card = yaml.safe_load(setup.card.read_text())
    return ClassificationTask(
        build("mlp", hidden=HIDDEN, seed=0),
        checkpoints=[str(p) for p in setup.checkpoints],
        learning_rates=[c["learning_rate"] for c in card["checkpoints"]],
    )
