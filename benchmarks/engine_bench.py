"""Attribution quality and cost on scikit-learn digits, side by side with traker and captum.

Setup (issue 2): digits standardised, fixed split 1000 train / 300 test, an MLP 64-128-10 and
logistic regression; 5 independently trained models (TRAK/influence ensembles) and a 5-checkpoint
trajectory of model 0 (TracIn); LDS against models retrained on 100 random 50% subsets; mislabel
AUC with 10% of the training labels flipped (models retrained on the noisy labels).

    python benchmarks/engine_bench.py                     # both models, everything
    python benchmarks/engine_bench.py --arch mlp --no-reference --subsets 40   # quicker

Prints one markdown table per model and, with --write, replaces the "Engine" section of
benchmarks/RESULTS.md. Reference libraries: `make bench-deps` (installed with --no-deps).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attribution import build_method, self_influence, suite
from attribution.datasets import flip_labels
from attribution.evaluate import lds, mislabel_auc
from attribution.tasks import ClassificationTask

RESULTS = Path(__file__).with_name("RESULTS.md")
CACHE = Path(".tda/cache")

# label → (registry name, arguments, number of ensemble models); tracin uses the trajectory
OURS: dict[str, tuple[str, dict, int]] = {
    "graddot": ("graddot", {}, 1),
    "gradcos": ("gradcos", {}, 1),
    "tracin (exact, 5 ckpts)": ("tracin", {}, 5),
    "tracin (512, 5 ckpts)": ("tracin", {"proj_dim": 512}, 5),
    "trak 512, 1 model": ("trak", {"proj_dim": 512}, 1),
    "trak 512, 5 models": ("trak", {"proj_dim": 512}, 5),
    "trak 2048, 5 models": ("trak", {"proj_dim": 2048}, 5),
    "influence ekfac, 1 model": ("influence", {"solver": "ekfac"}, 1),
    "influence ekfac, 5 models": ("influence", {"solver": "ekfac"}, 5),
    "influence exact, 1 model": ("influence", {"solver": "exact"}, 1),
    "influence exact, 5 models": ("influence", {"solver": "exact"}, 5),
    "influence cg, 1 model": ("influence", {"solver": "cg", "cg_iterations": 100}, 1),
}
QUICK = {
    "graddot",
    "tracin (512, 5 ckpts)",
    "trak 512, 5 models",
    "influence ekfac, 5 models",
    "influence exact, 1 model",
}


@dataclasses.dataclass
class Row:
    label: str
    lds: float
    auc: float | None
    seconds: float
    featurize_seconds: float | None = None
    note: str = ""


def _task_for(prepared: suite.Prepared, name: str, n_models: int) -> ClassificationTask:
    model = prepared.task.make_model(0)
    if name == "tracin":
        return ClassificationTask(model, checkpoints=prepared.trajectory)
    return ClassificationTask(model, checkpoints=prepared.ensemble[:n_models])


def run_ours(clean: suite.Prepared, noisy: suite.Prepared, truth, flipped, labels) -> list[Row]:
    rows = []
    for label, (name, arguments, n_models) in OURS.items():
        if label not in labels:
            continue
        start = time.perf_counter()
        method = build_method(name, _task_for(clean, name, n_models), **arguments)
        method.fit(clean.train)
        fitted = time.perf_counter()
        scores = method.score(clean.test)
        seconds = time.perf_counter() - start
        featurize = None
        if name == "trak":  # featurization alone, for the comparison with traker
            again = build_method(name, _task_for(clean, name, n_models), **arguments)
            t0 = time.perf_counter()
            again.featurize_train(again._examples(clean.train, "train"))
            featurize = time.perf_counter() - t0
        auc = None
        if name != "influence" or arguments.get("solver") != "cg":
            noisy_method = build_method(name, _task_for(noisy, name, n_models), **arguments).fit(
                noisy.train
            )
            auc = mislabel_auc(self_influence(noisy_method, noisy.train), flipped)
        value = lds(scores, truth.masks, truth.outputs).mean
        rows.append(Row(label, value, auc, seconds, featurize, f"fit {fitted - start:.1f}s"))
        extra = "" if featurize is None else f" (featurize {featurize:.1f}s)"
        print(
            f"  {label:28s} LDS {value:6.3f}  AUC {auc if auc is None else round(auc, 3)}  {seconds:6.1f}s{extra}",
            flush=True,
        )
    return rows


def run_traker(
    clean: suite.Prepared, truth, proj_dim: int, n_models: int, lambda_reg: float
) -> Row:
    """traker's TRAKer on CPU with the same checkpoints and proj_dim (BasicProjector)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = clean.task.make_model(0)
    n_params = sum(p.numel() for p in model.parameters())
    train_x, train_y = clean.train.x, clean.train.y
    with tempfile.TemporaryDirectory() as save_dir:
        projector = BasicProjector(
            n_params, proj_dim, seed=0, proj_type=ProjectionType.rademacher, device="cpu"
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(train_x),
            save_dir=save_dir,
            device="cpu",
            projector=projector,
            proj_dim=proj_dim,
            use_half_precision=False,
            lambda_reg=lambda_reg,
            logging_level=40,
        )
        start = time.perf_counter()
        for model_id, state in enumerate(clean.ensemble[:n_models]):
            traker.load_checkpoint(state, model_id=model_id)
            for i in range(0, len(train_x), 100):
                traker.featurize(
                    batch=(train_x[i : i + 100], train_y[i : i + 100]),
                    num_samples=len(train_x[i : i + 100]),
                )
        featurize = time.perf_counter() - start
        traker.finalize_features()
        for model_id, state in enumerate(clean.ensemble[:n_models]):
            traker.start_scoring_checkpoint(
                exp_name="test", checkpoint=state, model_id=model_id, num_targets=len(clean.test)
            )
            traker.score(batch=(clean.test.x, clean.test.y), num_samples=len(clean.test))
        scores = np.asarray(traker.finalize_scores(exp_name="test")).T
        seconds = time.perf_counter() - start
    value = lds(scores, truth.masks, truth.outputs).mean
    label = f"traker {proj_dim}, {n_models} models, λ={lambda_reg:g}"
    print(
        f"  {label:28s} LDS {value:6.3f}  {seconds:6.1f}s (featurize {featurize:.1f}s)", flush=True
    )
    return Row(label, value, None, seconds, featurize)


def run_captum(clean: suite.Prepared, noisy: suite.Prepared, truth, flipped) -> Row:
    """captum's TracInCP over the same trajectory checkpoints and learning rates."""
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    def run(prepared: suite.Prepared):
        model = prepared.task.make_model(0)
        states = {str(i): c.state for i, c in enumerate(prepared.trajectory)}
        lrs = {str(i): c.learning_rate or 1.0 for i, c in enumerate(prepared.trajectory)}

        def load(model, path):
            model.load_state_dict(states[path])
            return lrs[path]

        return TracInCP(
            model,
            TensorDataset(prepared.train.x, prepared.train.y),
            list(states),
            load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            batch_size=100,
        )

    start = time.perf_counter()
    scores = run(clean).influence((clean.test.x, clean.test.y), show_progress=False).numpy()
    seconds = time.perf_counter() - start
    auc = mislabel_auc(run(noisy).self_influence(show_progress=False).numpy(), flipped)
    value = lds(scores, truth.masks, truth.outputs).mean
    print(
        f"  {'captum TracInCP (exact)':28s} LDS {value:6.3f}  AUC {auc:.3f}  {seconds:6.1f}s",
        flush=True,
    )
    return Row("captum TracInCP (exact, 5 ckpts)", value, auc, seconds)


def featurize_speed(clean: suite.Prepared, proj_dim: int, repeats: int = 3) -> str:
    """TRAK featurization of 1000 examples × 5 checkpoints, ours vs traker's, interleaved."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    def ours() -> float:
        method = build_method("trak", _task_for(clean, "trak", 5), proj_dim=proj_dim)
        start = time.perf_counter()
        method.featurize_train(method._examples(clean.train, "train"))
        return time.perf_counter() - start

    def reference() -> float:
        model = clean.task.make_model(0)
        n_params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as save_dir:
            start = time.perf_counter()
            projector = BasicProjector(
                n_params, proj_dim, seed=0, proj_type=ProjectionType.rademacher, device="cpu"
            )
            traker = TRAKer(
                model=model,
                task="image_classification",
                train_set_size=len(clean.train),
                save_dir=save_dir,
                device="cpu",
                projector=projector,
                proj_dim=proj_dim,
                use_half_precision=False,
                logging_level=40,
            )
            for model_id, state in enumerate(clean.ensemble[:5]):
                traker.load_checkpoint(state, model_id=model_id)
                for i in range(0, len(clean.train), 100):
                    batch = (clean.train.x[i : i + 100], clean.train.y[i : i + 100])
                    traker.featurize(batch=batch, num_samples=len(batch[0]))
            return time.perf_counter() - start

    times_ours, times_ref = [], []
    for _ in range(repeats):
        times_ours.append(ours())
        times_ref.append(reference())
    a, b = float(np.median(times_ours)), float(np.median(times_ref))
    line = f"| {proj_dim} | {a:.2f} | {b:.2f} | {b / a:.1f}× |"
    print(line, flush=True)
    return line


def noisy_version(clean: suite.Prepared, fraction: float = 0.1):
    """Flip 10% of the training labels and retrain the same recipe on them."""
    y_noisy, flipped = flip_labels(clean.train.y, fraction, 10, seed=0)
    task = dataclasses.replace(
        clean.task, load=lambda: (type(clean.train)(clean.train.x, y_noisy), clean.test)
    )
    return suite.prepare_task(task, n_models=len(clean.ensemble)), flipped.numpy()


def table(arch: str, rows: list[Row], accuracy: float, subsets: int) -> str:
    lines = [
        f"### digits {arch} (test accuracy {accuracy:.3f}; LDS over {subsets} subsets at α = 0.5)",
        "",
        "| method | LDS | mislabel AUC | wall s (fit + score) | featurize s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        auc = "—" if r.auc is None else f"{r.auc:.3f}"
        feat = "—" if r.featurize_seconds is None else f"{r.featurize_seconds:.2f}"
        lines.append(f"| {r.label} | {r.lds:.3f} | {auc} | {r.seconds:.1f} | {feat} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="mlp,logreg", help="mlp, logreg or both")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a few methods only")
    parser.add_argument("--no-reference", action="store_true", help="skip traker and captum")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument(
        "--featurize", action="store_true", help="only TRAK featurization speed vs traker"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.featurize:
        clean = suite.prepare("digits-mlp", n_models=5)
        rows = [featurize_speed(clean, proj_dim) for proj_dim in (512, 2048)]
        body = (
            "TRAK featurization, digits MLP, 1000 examples × 5 checkpoints, CPU, median of 3 "
            "interleaved runs (seconds):\n\n| proj_dim | tdaserve | traker (BasicProjector) | speed-up |\n"
            "|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
        )
        print(body)
        if args.write:
            write_section("Engine featurization speed (issue 2)", body, " ".join(sys.argv[1:]))
        return
    labels = QUICK if args.quick else set(OURS)
    sections = []
    for arch in args.arch.split(","):
        name = {"mlp": "digits-mlp", "logreg": "digits-logreg"}[arch]
        print(f"== {name}", flush=True)
        clean = suite.prepare(name, n_models=5)
        truth = suite.ground_truth(
            clean, args.subsets, 0.5, CACHE / f"{name}-{args.subsets}x0.5.npz", progress=False
        )
        noisy, flipped = noisy_version(clean)
        rows = run_ours(clean, noisy, truth, flipped, labels)
        if not args.no_reference:
            for proj_dim in (512, 2048):
                rows.append(run_traker(clean, truth, proj_dim, 5, 0.0))
            rows.append(run_captum(clean, noisy, truth, flipped))
        sections.append(table(arch, rows, suite.test_accuracy(clean), args.subsets))
        print(sections[-1], flush=True)
    if args.write:
        write_results(sections, " ".join(sys.argv[1:]))


def write_results(sections: list[str], argv: str) -> None:
    write_section("Engine (issue 2)", "\n\n".join(sections) + "\n", argv)


def write_section(title: str, body: str, argv: str) -> None:
    """Replace (or append) the section ``## title`` of benchmarks/RESULTS.md."""
    header = (
        f"## {title}\n\n"
        f"Command: `python benchmarks/engine_bench.py {argv}` — {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
    block = header + body
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block
    )
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
