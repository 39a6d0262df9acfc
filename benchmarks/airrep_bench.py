"""AirRep (issue 5) on the digits MLP: LDS against TRAK, and inference cost per example.

Setup: ``suite.prepare("digits-mlp")`` (1000 train / 300 test, 5 models for TRAK) and its cached
test-split ground truth (100 subsets, plan seed 0). AirRep's targets come from a *separate dev
split* of digits (the 497 examples left after train and test, standardised with the train
statistics) and its own subset retraining (plan seed 1, the same recipe, ``--dev-subsets``
subsets, cached in ``.tda/cache``). The test split is never used for training.

    python benchmarks/airrep_bench.py                       # print the table
    python benchmarks/airrep_bench.py --write               # and append it to RESULTS.md

"Inference cost" is the wall time per example of computing train-side vectors (what indexing a
corpus costs) and query vectors: AirRep = one encoder forward pass; TRAK = projected per-example
gradients over the ensemble.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from attribution import suite
from attribution.datasets import load_digits_split
from attribution.evaluate import SubsetPlan, SubsetResults, lds, retrain_on_subsets
from attribution.methods import AirRep, build_method, group_score
from attribution.tasks import ClassificationTask

RESULTS = Path(__file__).with_name("RESULTS.md")
CACHE = Path(".tda/cache")


def dev_split(prepared: suite.Prepared):
    """The digits examples outside train and test, standardised like them."""
    _, rest = load_digits_split(n_train=1000, n_test=797, seed=0)
    if not torch.equal(rest.x[:300], prepared.test.x):
        raise SystemExit("the dev split does not line up with the prepared test split")
    return rest.subset(list(range(300, 797)))


def dev_subsets(prepared: suite.Prepared, dev, n_subsets: int) -> tuple[SubsetResults, float]:
    cache = CACHE / f"airrep-dev-digits-mlp-{n_subsets}x0.5.npz"
    if cache.exists():
        results = SubsetResults.load(cache)
        return results, float(results.meta.get("seconds", float("nan")))
    plan = SubsetPlan(len(prepared.train), 0.5, n_subsets, seed=1)
    start = time.perf_counter()
    results = retrain_on_subsets(
        plan, prepared.task.make_model, ClassificationTask, prepared.train, dev, prepared.task.config
    )
    results.meta["seconds"] = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    results.save(cache)
    return results, results.meta["seconds"]


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
    from scipy.stats import spearmanr

    per = [spearmanr(predicted[:, j], outputs[:, j]).statistic for j in range(outputs.shape[1])]
    return float(np.nanmean(per))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev-subsets", type=int, default=100)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    prepared = suite.prepare("digits-mlp", n_models=5)
    truth = suite.ground_truth(prepared, 100, 0.5, cache=CACHE / "digits-mlp-100x0.5.npz")
    dev = dev_split(prepared)
    dev_results, retrain_s = dev_subsets(prepared, dev, args.dev_subsets)

    rows = []
    trak = build_method("trak", prepared.attribution_task("trak"), device="cpu", proj_dim=512)
    trak.fit(prepared.train)
    trak_lds = lds(trak.score(prepared.test), truth.masks, truth.outputs).mean
    trak_feat = timed(lambda: trak.featurize_train(trak._examples(prepared.train, "train")), 1)
    trak_query = timed(lambda: trak.query_vectors(prepared.test), 1)
    rows.append(("trak 512, 5 models", trak_lds, "—", trak_feat, trak_query, 512, "—"))

    task = ClassificationTask(prepared.task.make_model(0))
    untrained = AirRep(task, device="cpu", dim=args.dim, hidden=256).fit(prepared.train)
    trained, seconds, histories = {}, {}, {}
    for pooling in ("attention", "mean"):
        start = time.perf_counter()
        trained[pooling] = AirRep(
            task,
            device="cpu",
            dim=args.dim,
            hidden=256,
            subsets=dev_results,
            dev=dev,
            steps=args.steps,
            learning_rate=1e-3,
            subsets_per_step=32,
            dev_per_step=64,
            pooling=pooling,
        ).fit(prepared.train)
        seconds[pooling] = time.perf_counter() - start
        histories[pooling] = trained[pooling].history
    candidates = [("airrep untrained", untrained)] + [
        (f"airrep trained ({pooling} pooling)", method) for pooling, method in trained.items()
    ]
    for label, method in candidates:
        examples = method._examples(prepared.train, "train")
        feat = timed(lambda m=method, e=examples: m.featurize_train(e))
        query = timed(lambda m=method: m.query_vectors(prepared.test))
        score = lds(method.score(prepared.test), truth.masks, truth.outputs).mean
        glds = group_lds(method, prepared.test, truth.masks, truth.outputs)
        rows.append((label, score, f"{glds:.3f}", feat, query, args.dim, None))

    lines = [
        "| method | LDS (sum) | LDS (group score) | train vectors s / 1000 | query s / 300 | "
        "dim | featurize cost vs TRAK |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, score, glds, feat, query, dim, _ in rows:
        ratio = "1×" if label.startswith("trak") else f"{trak_feat / feat:.0f}× cheaper"
        lines.append(
            f"| {label} | {score:.3f} | {glds} | {feat:.4f} | {query:.4f} | {dim} | {ratio} |"
        )
    table = "\n".join(lines)
    info = (
        f"AirRep training: {len(dev_results)} models retrained on 50% subsets of train, measured "
        f"on {len(dev)} dev examples ({retrain_s:.0f} s, cached), then {args.steps} Adam steps "
        f"per pooling ({seconds['attention']:.1f} s attention, {seconds['mean']:.1f} s mean); "
        + "; ".join(
            f"{p} RankNet loss {h[0]:.3f} → {np.mean(h[-20:]):.3f}" for p, h in histories.items()
        )
        + " (first step → mean of the last 20 steps)."
    )
    print(table)
    print(info)
    if args.write:
        header = (
            "\n## AirRep (issue 5)\n\n"
            f"Command: `python benchmarks/airrep_bench.py --dev-subsets {args.dev_subsets} "
            f"--steps {args.steps} --dim {args.dim} --write` — {platform.machine()}, 1 thread, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n"
            "Digits MLP (1000 train / 300 test), LDS over the cached 100 test-split subsets. "
            "AirRep never sees the test split: it is trained on a separate 497-example dev split "
            "with its own subset retraining. LDS (sum) predicts a subset's effect by Σ of scores "
            "(the common yardstick); LDS (group score) by AirRep's attention-pooled group score.\n\n"
        )
        with open(RESULTS, "a") as handle:
            handle.write(header + table + "\n\n" + info + "\n")


if __name__ == "__main__":
    main()
