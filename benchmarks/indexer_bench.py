"""Indexer benchmark: build throughput (vs traker's featurize) and query latency / recall / memory.

Vectors are real: TRAK train-side vectors of the digits MLP 64-128-10 (issue 2's recipe) over
augmented digits (±1 px shifts, intensity ×U(0.8, 1.2), pixel noise σ = 0.5), queried with the
TRAK query vectors of augmented *held-out* digits. d = 512: one checkpoint, proj_dim 512;
d = 2048: four checkpoints of the same run × proj_dim 512 (TRAK's checkpoint ensemble).

    python benchmarks/indexer_bench.py throughput --n 20000
    python benchmarks/indexer_bench.py queries --n 100000 --d 512 --kinds flat ivf_flat ivf_pq hnsw
    python benchmarks/indexer_bench.py latency --n 1000000 --d 512   # re-time every kind built
    python benchmarks/indexer_bench.py render      # markdown table of everything measured

Results accumulate in ``<workdir>/results.json`` (default ``/tmp/tda-indexer-bench``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

WORKDIR = Path(os.environ.get("TDA_BENCH_DIR", "/tmp/tda-indexer-bench"))


# --- data and model ---------------------------------------------------------------------------
def digits_split(seed: int = 0, n_train: int = 1000, n_test: int = 300):
    """Raw 8×8 digits and the train statistics of ``attribution.datasets.load_digits_split``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std < 1e-8] = 1.0
    return x[train], y[train], x[test], y[test], mean, std


def augment(raw: np.ndarray, labels: np.ndarray, n: int, seed: int, mean: np.ndarray, std: np.ndarray):
    """n standardised augmented digits drawn from ``raw`` (shifts, intensity, noise)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(raw), n)
    images = raw[pick].reshape(n, 8, 8)
    out = np.zeros_like(images)
    dx, dy = rng.integers(-1, 2, n), rng.integers(-1, 2, n)
    for sx in (-1, 0, 1):
        for sy in (-1, 0, 1):
            mask = (dx == sx) & (dy == sy)
            shifted = np.roll(images[mask], (sy, sx), axis=(1, 2))
            if sy == 1:
                shifted[:, 0] = 0
            if sy == -1:
                shifted[:, -1] = 0
            if sx == 1:
                shifted[:, :, 0] = 0
            if sx == -1:
                shifted[:, :, -1] = 0
            out[mask] = shifted
    out = out * rng.uniform(0.8, 1.2, (n, 1, 1)) + rng.normal(0, 0.5, out.shape)
    out = np.clip(out, 0, 16).reshape(n, 64)
    return ((out - mean) / std).astype(np.float32), labels[pick].astype(np.int64)


def prepare(workdir: Path) -> dict:
    """Train the MLP once, save 4 checkpoints and the two cards; cached in ``workdir``."""
    state_file = workdir / "prepared.json"
    if state_file.is_file():
        return json.loads(state_file.read_text())
    from safetensors.torch import save_file

    from attribution.data import Examples
    from attribution.models import build
    from attribution.tasks import ClassificationTask
    from attribution.training import TrainConfig, accuracy, train

    workdir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte, mean, std = digits_split()
    train_set = Examples(torch.from_numpy(((xtr - mean) / std).astype(np.float32)), torch.from_numpy(ytr))
    test_set = Examples(torch.from_numpy(((xte - mean) / std).astype(np.float32)), torch.from_numpy(yte))
    model = build("mlp", seed=0)
    result = train(model, ClassificationTask, train_set, TrainConfig(checkpoints=4))
    checkpoints = []
    for i, ckpt in enumerate(result.checkpoints):
        path = workdir / f"ckpt-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(path))
        checkpoints.append({"path": path.name, "learning_rate": ckpt.learning_rate, "step": ckpt.step})
    arch = {"builtin": "mlp", "config": {"in_features": 64, "hidden": 128, "num_classes": 10, "seed": 0}}
    for name, chosen in (("card-512.yaml", checkpoints[-1:]), ("card-2048.yaml", checkpoints)):
        (workdir / name).write_text(yaml.safe_dump({"task": "classification", "architecture": arch,
                                                    "checkpoints": chosen}))
    info = {"test_accuracy": accuracy(model, test_set), "checkpoints": checkpoints}
    state_file.write_text(json.dumps(info))
    return info


def corpus(workdir: Path, n: int) -> Path:
    """Parquet corpus of n augmented training digits (prefixes of one stream: same first rows)."""
    path = workdir / f"corpus-{n}.parquet"
    if path.is_file():
        return path
    xtr, ytr, _, _, mean, std = digits_split()
    x, y = augment(xtr, ytr, n, seed=1, mean=mean, std=std)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    table = pa.table({"id": [f"aug-{i:07d}" for i in range(n)], "features": flat, "label": y,
                      "source": pa.array(["digits-augmented"] * n)})
    pq.write_table(table, path, row_group_size=65536)
    return path


def held_out_queries(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, xte, yte, mean, std = digits_split()
    x, y = augment(xte, yte, n, seed=2, mean=mean, std=std)
    return torch.from_numpy(x), torch.from_numpy(y)


# --- results ------------------------------------------------------------------------------------
def record(workdir: Path, key: str, value: dict) -> None:
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps({key: value}, indent=1), flush=True)


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# --- throughput ---------------------------------------------------------------------------------
def throughput(workdir: Path, n: int, proj_dim: int = 512) -> None:
    """Examples/s of a whole index build vs traker's featurize (+ finalize) on one checkpoint."""
    from indexer.build import build_index

    prepare(workdir)
    path = corpus(workdir, n)
    root = workdir / "throughput"
    shutil.rmtree(root, ignore_errors=True)
    ours = {}
    for self_influence in (False, True):
        started = time.perf_counter()
        result = build_index(workdir / "card-512.yaml", path, name=f"tp-{int(self_influence)}", root=root,
                             method_args={"proj_dim": proj_dim, "batch_size": 256}, dtype="float16",
                             shard_size=8192, self_influence=self_influence, show_progress=False)
        seconds = time.perf_counter() - started
        ours[f"build_self_influence={self_influence}"] = {
            "seconds": round(seconds, 2), "examples_per_s": round(n / seconds, 1),
            "featurize_examples_per_s": round(n / result.manifest["build"]["featurize_seconds"], 1),
        }
    record(workdir, f"throughput/n={n}", {"n": n, "proj_dim": proj_dim, "ours": ours,
                                          "traker": traker_featurize(workdir, path, n, proj_dim),
                                          "load": load_average()})


def traker_featurize(workdir: Path, path: Path, n: int, proj_dim: int) -> dict:
    try:
        from trak import TRAKer
    except ImportError as err:
        return {"skipped": f"traker is not installed ({err})"}
    from safetensors.torch import load_file

    from attribution.models import build

    table = pq.read_table(path)
    x = torch.from_numpy(np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32))
    y = torch.from_numpy(table.column("label").to_numpy())
    model = build("mlp", seed=0)
    checkpoint = load_file(str(workdir / "ckpt-3.safetensors"))
    model.load_state_dict(checkpoint)
    model.eval()
    save_dir = workdir / "traker"
    shutil.rmtree(save_dir, ignore_errors=True)
    traker = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=str(save_dir),
                    device="cpu", proj_dim=proj_dim, use_half_precision=False, load_from_save_dir=False,
                    logging_level=40)
    started = time.perf_counter()
    traker.load_checkpoint(checkpoint, model_id=0)
    for start in range(0, n, 256):
        traker.featurize(batch=(x[start : start + 256], y[start : start + 256]), num_samples=len(x[start : start + 256]))
    featurized = time.perf_counter() - started
    traker.finalize_features()
    total = time.perf_counter() - started
    shutil.rmtree(save_dir, ignore_errors=True)
    return {"featurize_seconds": round(featurized, 2), "featurize_examples_per_s": round(n / featurized, 1),
            "featurize_finalize_examples_per_s": round(n / total, 1)}


# --- queries ------------------------------------------------------------------------------------
def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples) * 1e3, q)), 2)


def queries(workdir: Path, n: int, d: int, kinds: list[str], singles: int, batches: int,
            n_queries: int) -> None:
    """Build (or reuse) the n × d index, then time and score every FAISS kind over it."""
    from indexer.build import build_index
    from indexer.faiss_index import exact_topk, recall_at_k
    from indexer.index import AttributionIndex
    from indexer.layout import locked, write_current
    from indexer.update import rebuild_faiss, retune

    prepare(workdir)
    card = workdir / f"card-{d}.yaml"
    root = workdir / "indexes"
    name = f"digits-{n}-{d}"
    started = time.perf_counter()
    result = build_index(card, corpus(workdir, n), name=name, root=root, method_args={"proj_dim": 512, "batch_size": 256},
                         dtype="float16", shard_size=65536, self_influence=False, index_kind="flat")
    build_seconds = time.perf_counter() - started
    if not result.reused:
        record(workdir, f"build/{name}", {"n": n, "d": d, "seconds": round(build_seconds, 1),
                                          "examples_per_s": round(n / build_seconds, 1),
                                          "manifest_build": result.manifest["build"], "load": load_average()})
    base = AttributionIndex.open(result.path)
    assert base.dim == d, (base.dim, d)
    q = base.query_vectors(held_out_queries(n_queries))
    truth = exact_topk(q, base.store.blocks(), 10)
    truth_opp = exact_topk(-q, base.store.blocks(), 10)
    shard_bytes = sum((base.path / s["file"]).stat().st_size for s in base.manifest["shards"]) / n
    base_kind = base.spec.kind
    del base
    gc.collect()
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == base_kind:
            index = AttributionIndex.open(result.path)
            faiss_seconds = index.manifest["faiss"]["build_seconds"]
        elif (existing := published_kind(result.path.parent.parent, kind)) is not None:
            # built in an earlier run: serve it again and only re-tune its search parameters
            with locked(result.path.parent.parent):
                write_current(result.path.parent.parent, existing)
            index = retune(result.path.parent.parent)
            faiss_seconds = index.manifest["faiss"]["build_seconds"]
        else:
            index = rebuild_faiss(result.path.parent.parent, kind)
            faiss_seconds = time.perf_counter() - t0
        for i in range(5):
            index.topk(q[i], k=10)  # warm up (pages, caches)
        single, cpu = [], []
        for i in range(singles):
            t, c = time.perf_counter(), time.thread_time()
            index.topk(q[i % len(q)], k=10)
            single.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        batched = []
        for b in range(batches):
            chunk = q[(b * 64) % len(q) : (b * 64) % len(q) + 64]
            t = time.perf_counter()
            index.topk(chunk, k=10)
            batched.append(time.perf_counter() - t)
        found = index.topk(q, k=10).rows
        found_opp = index.topk(q, k=10, opponents=True).rows
        faiss_bytes = (index.path / "index.faiss").stat().st_size / n
        record(workdir, f"query/{name}/{kind}", {
            "n": n, "d": d, "kind": kind, "params": index.spec.params,
            "faiss_build_seconds": round(faiss_seconds, 1),
            "single_p50_ms": percentile_ms(single, 50), "single_p99_ms": percentile_ms(single, 99),
            "single_cpu_p50_ms": percentile_ms(cpu, 50), "single_cpu_p99_ms": percentile_ms(cpu, 99),
            "batch64_p50_ms": percentile_ms(batched, 50), "batch64_p99_ms": percentile_ms(batched, 99),
            "recall_at_10": round(recall_at_k(found, truth), 4),
            "recall_at_10_opponents": round(recall_at_k(found_opp, truth_opp), 4),
            "build_time_recall": index.manifest["faiss"]["recall"].get("recall"),
            "faiss_bytes_per_vector": round(faiss_bytes, 1), "shard_bytes_per_vector": round(shard_bytes, 1),
            "load": load_average(),
        })
        del index
        gc.collect()


def published_kind(directory: Path, kind: str) -> str | None:
    """The newest version whose FAISS part is ``kind`` with today's default parameters."""
    from indexer.faiss_index import choose_spec
    from indexer.layout import read_manifest, versions

    tuned = ("nprobe", "ef_search", "nprobe_opponents", "ef_search_opponents")
    for version in reversed(versions(directory)):
        manifest = read_manifest(directory / "versions" / version)
        faiss = manifest["faiss"]
        defaults = choose_spec(manifest["counts"]["live"], manifest["dim"], kind, dtype=manifest["dtype"]).params
        same = {k: v for k, v in faiss["params"].items() if k not in tuned} == {
            k: v for k, v in defaults.items() if k not in tuned}
        if faiss["kind"] == kind and not faiss.get("user_params") and same:
            return version
    return None


def latency(workdir: Path, n: int, d: int, count: int) -> None:
    """Re-time every published FAISS kind of the n × d index: ``count`` single queries per
    direction (proponents and opponents), nothing else running in this process."""
    from indexer.index import AttributionIndex
    from indexer.layout import read_manifest, versions

    directory = workdir / "indexes" / f"digits-{n}-{d}"
    q = None
    for version in versions(directory):
        kind = read_manifest(directory / "versions" / version)["faiss"]["kind"]
        index = AttributionIndex.open(directory / "versions" / version)
        if q is None:
            q = index.query_vectors(held_out_queries(count))
        for i in range(10):
            index.topk(q[i], k=10)
        row = {"n": n, "d": d, "kind": kind, "version": version, "queries": count, "load": load_average()}
        for direction, opponents in (("proponents", False), ("opponents", True)):
            times = []
            for i in range(count):
                t = time.perf_counter()
                index.topk(q[i], k=10, opponents=opponents)
                times.append(time.perf_counter() - t)
            row[f"{direction}_p50_ms"] = percentile_ms(times, 50)
            row[f"{direction}_p99_ms"] = percentile_ms(times, 99)
        record(workdir, f"latency/digits-{n}-{d}/{kind}", row)
        del index
        gc.collect()


# --- report ----------------------------------------------------------------------------------
def render(workdir: Path) -> None:
    results = json.loads((workdir / "results.json").read_text())
    print("| n | d | index | parameters | single p50 / p99 ms | single CPU p50 / p99 ms | batch-64 p50 / p99 ms | recall@10 (pro / opp) | FAISS B/vector | fp16 shard B/vector | FAISS build s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for _key, r in sorted((k, v) for k, v in results.items() if k.startswith("query/")):
        shown = {k: v for k, v in r["params"].items() if v is not None and k != "train_size"}
        print(f"| {r['n']:,} | {r['d']} | {r['kind']} | {json.dumps(shown)} | {r['single_p50_ms']} / {r['single_p99_ms']} | "
              f"{r.get('single_cpu_p50_ms')} / {r.get('single_cpu_p99_ms')} | "
              f"{r['batch64_p50_ms']} / {r['batch64_p99_ms']} | {r['recall_at_10']:.3f} / {r['recall_at_10_opponents']:.3f} | "
              f"{r['faiss_bytes_per_vector']:.0f} | {r['shard_bytes_per_vector']:.0f} | {r['faiss_build_seconds']} | {r['load']} |")
    print()
    lat = sorted((k, v) for k, v in results.items() if k.startswith("latency/"))
    if lat:
        print("| n | d | index | proponents p50 / p99 ms | opponents p50 / p99 ms | queries | load avg |")
        print("|---|---|---|---|---|---|---|")
        for _key, r in lat:
            print(f"| {r['n']:,} | {r['d']} | {r['kind']} | {r['proponents_p50_ms']} / {r['proponents_p99_ms']} | "
                  f"{r['opponents_p50_ms']} / {r['opponents_p99_ms']} | {r['queries']} | {r['load']} |")
        print()
    for key, r in sorted(results.items()):
        if key.startswith("build/"):
            print(f"- build {key[6:]}: {r['seconds']} s, {r['examples_per_s']} examples/s (load {r['load']})")
        if key.startswith("throughput/"):
            print(f"- {key}: ours {json.dumps(r['ours'])}; traker {json.dumps(r['traker'])} (load {r['load']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    sub = parser.add_subparsers(dest="command", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("--n", type=int, default=20000)
    qp = sub.add_parser("queries")
    qp.add_argument("--n", type=int, default=100_000)
    qp.add_argument("--d", type=int, choices=(512, 2048), default=512)
    qp.add_argument("--kinds", nargs="+", default=["flat", "ivf_flat", "ivf_pq", "hnsw"])
    qp.add_argument("--singles", type=int, default=300)
    qp.add_argument("--batches", type=int, default=15)
    qp.add_argument("--queries", type=int, default=500, help="held-out queries for recall")
    lp = sub.add_parser("latency")
    lp.add_argument("--n", type=int, default=1_000_000)
    lp.add_argument("--d", type=int, choices=(512, 2048), default=512)
    lp.add_argument("--queries", type=int, default=1000)
    sub.add_parser("render")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "throughput":
        throughput(args.workdir, args.n)
    elif args.command == "queries":
        queries(args.workdir, args.n, args.d, args.kinds, args.singles, args.batches, args.queries)
    elif args.command == "latency":
        latency(args.workdir, args.n, args.d, args.queries)
    else:
        render(args.workdir)


if __name__ == "__main__":
    main()
