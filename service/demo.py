"""``tda demo``: the whole system on one machine, answering attribution queries over HTTP.

1. train a small MLP on scikit-learn's digits (10% of the labels flipped on purpose), keeping a
   few checkpoints, and write its model card, checkpoints and corpus into the data dir;
2. start the service the way ``tda serve`` does (embedded Redis, a worker process, uvicorn);
3. over HTTP: register the model and corpus, build a TRAK index (a job, with progress), ask
   for the top-k proponents and opponents of a few test predictions, and run a ``mislabel``
   job that should find the flipped labels;
4. print it all readably, digits drawn as small text images;
5. train a tiny GPT-2 that memorises planted passages and trace one of its outputs to the
   training document it copied (``POST /v1/provenance``, see :mod:`service.demo_provenance`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

SHADES = " .:-=+*#%@"


@dataclass
class DigitsData:
    """What :func:`prepare_digits` wrote (paths relative to the file area) and the test set."""

    card: str
    corpus: str
    test_x: np.ndarray  # standardised inputs, (n_test, 64)
    test_y: np.ndarray
    test_images: np.ndarray  # raw 0–16 pixels, (n_test, 64)
    flipped: np.ndarray  # ids of records whose label was flipped
    accuracy: float


def prepare_digits(files_dir: Path, n_train: int = 1000, n_test: int = 100,
                   checkpoints: int = 3, flip_fraction: float = 0.1, epochs: int = 300,
                   hidden: int = 64, seed: int = 0, folder: str = "digits") -> DigitsData:
    """Train the digits MLP and write card, checkpoints and corpus under ``files_dir/folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import yaml
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from attribution.data import Examples
    from attribution.datasets import flip_labels, load_digits_split
    from attribution.models import build
    from attribution.tasks import ClassificationTask
    from attribution.training import TrainConfig, accuracy, train

    out = files_dir / folder
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_digits_split(n_train=n_train, n_test=n_test, seed=seed)
    raw = load_digits().data  # to draw the pictures: the split below mirrors load_digits_split
    order = np.random.default_rng(seed).permutation(raw.shape[0])
    train_raw, test_raw = raw[order[:n_train]], raw[order[n_train:n_train + n_test]]
    noisy, flipped = flip_labels(train_set.y, flip_fraction, 10, seed)
    noisy_set = Examples(train_set.x, noisy)
    model = build("mlp", hidden=hidden, seed=seed)
    with torch.random.fork_rng(devices=[]):
        result = train(model, ClassificationTask, noisy_set,
                       TrainConfig(epochs=epochs, checkpoints=checkpoints, seed=seed))
    specs = []
    for i, ckpt in enumerate(result.checkpoints):
        path = out / f"ckpt-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(path))
        specs.append({"path": path.name, "learning_rate": ckpt.learning_rate, "step": ckpt.step})
    card = {"name": f"{folder}-mlp", "task": "classification",
            "architecture": {"builtin": "mlp", "config": {"hidden": hidden, "seed": seed}},
            "checkpoints": specs}
    (out / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    ids = np.array([f"digit-{i:05d}" for i in range(n_train)])
    table = pa.table({
        "id": ids,
        "features": pa.array(list(train_set.x.numpy()), type=pa.list_(pa.float32())),
        "label": noisy.numpy().astype(np.int64),
        "given_label": noisy.numpy().astype(np.int64),
        "true_label": train_set.y.numpy().astype(np.int64),
        "flipped": flipped.numpy(),
        "image": ["".join("0123456789abcdefg"[int(v)] for v in row) for row in train_raw],
        "source": [f"sklearn-digits/{int(i)}" for i in order[:n_train]],
    })
    pq.write_table(table, out / "train.parquet")
    return DigitsData(
        card=f"{folder}/model.yaml", corpus=f"{folder}/train.parquet",
        test_x=test_set.x.numpy(), test_y=test_set.y.numpy(), test_images=test_raw,
        flipped=ids[flipped.numpy()], accuracy=accuracy(model, test_set),
    )


def draw(pixels: Any) -> list[str]:
    """An 8×8 digit (64 values 0–16, or a hex string from the corpus) as 8 lines of text."""
    values = [int(c, 17) for c in pixels] if isinstance(pixels, str) else [int(v) for v in pixels]
    return ["".join(SHADES[min(v * len(SHADES) // 17, len(SHADES) - 1)]
                    for v in values[r * 8:(r + 1) * 8]) for r in range(8)]


def side_by_side(blocks: list[list[str]], captions: list[tuple[str, str]], width: int = 10) -> str:
    """Digits in a row, each under a two-line caption (fits 80 columns for 7 digits)."""
    lines = [" ".join(c[i][: width - 1].ljust(width) for c in captions) for i in (0, 1)]
    lines += [" ".join(b[r].ljust(width) for b in blocks) for r in range(8)]
    return "\n".join(lines)


def run_demo(data_dir: Path | None = None, port: int | None = None, n_queries: int = 3,
             k: int = 3, keep_running: bool = False) -> None:
    """Train, serve, query and run a job over HTTP, printing what happens."""
    from service.client import Client
    from service.core.config import Settings
    from service.core.security import ensure_bootstrap_key
    from service.embedded import Embedded, free_port

    console = Console()
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    settings = settings.model_copy(update={"port": port or free_port(settings.host)})
    files = settings.files_dir("default")
    started = time.time()

    console.rule("[bold]1. Train a digits MLP (10% of labels flipped on purpose)")
    data = prepare_digits(files)
    console.print(f"test accuracy {data.accuracy:.3f}; wrote {data.card}, {data.corpus} "
                  f"and 3 checkpoints under {files}")

    console.rule("[bold]2. Start the service (Redis, a worker process, uvicorn)")
    system = Embedded(settings)
    try:
        system.start()
        key, _ = ensure_bootstrap_key(settings.data_dir)
        console.print(f"API at {system.url} (docs: {system.url}/docs); Redis at "
                      f"{system.settings.redis_url}")
        with Client(system.url, key) as tda:
            _register(tda, "digits", data)
            console.rule("[bold]3. Build a TRAK index (a build_index job)")
            job = tda.submit("build_index", {"name": "digits", "model": "digits",
                                             "corpus": "digits", "method": "trak",
                                             "method_args": {"proj_dim": 512}})
            done = _wait(tda, job["id"], console)
            console.print(f"index {done['result']['summary']['name']} "
                          f"{done['result']['summary']['version']}: "
                          f"{done['result']['summary']['records']} records, "
                          f"{done['result']['summary']['dim']} dims")

            console.rule("[bold]4. Top-k over HTTP: which training digits made these predictions?")
            answer = tda.topk("digits", data.test_x[:n_queries], data.test_y[:n_queries].tolist(),
                              k=k, opponents=True)
            for j, result in enumerate(answer["results"]):
                hits = result["proponents"] + result["opponents"]
                blocks = [draw(data.test_images[j])] + [draw(h["metadata"]["image"]) for h in hits]
                captions = [("test", f"label {int(data.test_y[j])}")] + [
                    (f"{h['score']:+.2g}", f"label {h['metadata']['given_label']}") for h in hits]
                console.print(f"\n[bold]test example {j}[/]: the {k} most helpful, then the {k} "
                              "most harmful training digits")
                console.print(side_by_side(blocks, captions), highlight=False)

            console.rule("[bold]5. Find mislabelled training digits (a mislabel job)")
            job = tda.submit("mislabel", {"index": "digits"})
            done = _wait(tda, job["id"], console)
            top = tda.result(job["id"], limit=20)["items"]
            table = Table("rank", "id", "self-influence", "label", "true label", "flipped?")
            for row in top[:10]:
                table.add_row(str(row["rank"]), row["id"], f"{row['self_influence']:.3g}",
                              str(row["given_label"]), str(row["true_label"]),
                              "[red]yes[/]" if row["flipped"] else "no")
            console.print(table)
            found = sum(bool(r["flipped"]) for r in top)
            console.print(f"{found} of the 20 most self-influential digits had flipped labels "
                          f"(10% of the corpus is flipped, so chance would find ~2).")

            console.rule("[bold]6. Provenance: where does a language model's output come from?")
            from service.demo_provenance import run_provenance_demo

            run_provenance_demo(tda, files, console, _wait)
        console.rule(f"[bold green]done in {time.time() - started:.0f} s")
        if keep_running:
            console.print(f"serving at {system.url} with key {key}; Ctrl-C stops")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        system.stop()


def _register(tda: Any, name: str, data: DigitsData) -> None:
    from service.client import APIError

    for kind, path in (("models", data.card), ("corpora", data.corpus)):
        with contextlib.suppress(APIError):
            tda.request("DELETE", f"/v1/{kind}/{name}")
        tda.register(kind, name, path)


def _wait(tda: Any, job_id: str, console: Console) -> dict:
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("queued", total=1.0)

        def show(job: dict) -> None:
            bar.update(task, completed=job["progress"]["fraction"],
                       description=f"{job['kind']}: {job['progress']['stage'][:40]}")

        return tda.wait(job_id, on_progress=show, interval=0.3)
