"""Readable terminal output for ``tda eval lds`` and the engine demo (rich tables, ASCII digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from attribution import suite

console = Console()
_SHADES = " .:-=+*#%@"


def ascii_digit(pixels: np.ndarray) -> list[str]:
    """An 8×8 digit as 8 lines of characters, darker = more ink (contrast per image)."""
    image = np.asarray(pixels, dtype=np.float64).reshape(8, 8)
    low, high = image.min(), image.max()
    levels = np.zeros_like(image) if high <= low else (image - low) / (high - low)
    index = np.minimum((levels * len(_SHADES)).astype(int), len(_SHADES) - 1)
    return ["".join(_SHADES[i] * 2 for i in row) for row in index]


def _side_by_side(images: list[list[str]], captions: list[str]) -> str:
    width = max(len(images[0][0]), max(len(c) for c in captions)) + 2
    lines = ["".join(c.ljust(width) for c in captions)]
    for row in range(len(images[0])):
        lines.append("".join(img[row].ljust(width) for img in images))
    return "\n".join(lines)


def _selected_methods(methods: str) -> dict[str, tuple[str, dict]]:
    if not methods:
        return suite.DEFAULT_METHODS
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in suite.DEFAULT_METHODS]
    if unknown:
        raise SystemExit(
            f"unknown method(s) {unknown}; choose from {', '.join(suite.DEFAULT_METHODS)}"
        )
    return {m: suite.DEFAULT_METHODS[m] for m in chosen}


def print_lds_table(
    task: str, methods: str, models: int, subsets: int, alpha: float, cache: Path
) -> None:
    """Train the task's models, retrain on subsets (cached), and print LDS and time per method."""
    chosen = _selected_methods(methods)
    with console.status(f"training {models} model(s) on {task}"):
        prepared = suite.prepare(task, n_models=models)
    console.print(
        f"{task}: {len(prepared.train)} train / {len(prepared.test)} test, "
        f"test accuracy {suite.test_accuracy(prepared):.3f}"
    )
    truth = suite.ground_truth(prepared, subsets, alpha, cache / f"{task}-{subsets}x{alpha}.npz")
    table = Table(title=f"LDS on {task} ({subsets} subsets at α={alpha})")
    for column in ("method", "LDS", "seconds"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for label, (name, arguments) in chosen.items():
        with console.status(f"scoring with {label}"):
            report = suite.evaluate_method(prepared, truth, label, name, arguments)
        table.add_row(label, f"{report.lds:.3f}", f"{report.seconds:.1f}")
    console.print(table)


def run_engine_demo(top: int = 3, subsets: int = 40, examples: int = 3) -> None:
    """Who made these predictions? Top proponents/opponents per method, then each method's LDS."""
    with console.status("training 5 digits MLPs (64-128-10) on 1000 examples"):
        prepared = suite.prepare("digits-mlp", n_models=5)
    console.print(f"[bold]digits-mlp[/bold]: test accuracy {suite.test_accuracy(prepared):.3f}\n")
    name, arguments = suite.DEFAULT_METHODS["trak-512"]
    with console.status("fitting TRAK (5 models, 512 dims)"):
        method = suite.fit_method(prepared, name, arguments)
    picks = np.arange(examples)
    scores = method.score((prepared.test.x[picks], prepared.test.y[picks]))
    proponents, opponents = suite.top_examples(scores, top)
    train_x, train_y = prepared.train.x.numpy(), prepared.train.y.numpy()
    for row, j in enumerate(picks):
        console.rule(f"test example {j}: label {int(prepared.test.y[j])}")
        images = [ascii_digit(prepared.test.x[j].numpy())]
        captions = ["test"]
        for kind, order in (("+", proponents[row]), ("-", opponents[row])):
            for i in order:
                images.append(ascii_digit(train_x[i]))
                captions.append(f"{kind}#{i} y={train_y[i]} {scores[row, i]:+.2g}")
        console.print(_side_by_side(images, captions))
    console.print(
        "\n+ = proponents (training examples that raised the correct-class margin), "
        "- = opponents.\n"
    )
    print_lds_table("digits-mlp", "", 5, subsets, 0.5, Path(".tda/cache"))
