"""Service benchmark: HTTP top-k latency and throughput, and small-job throughput.

The whole system runs as in production on this machine (Redis, a Celery worker process,
uvicorn on loopback); the load generator is a bounded asyncio client in this process.

* top-k: POST /v1/indexes/digits100k/topk, one example per request (k = 10, query
  featurization included), at concurrency 1, 16 and 64, against a TRAK index of 100k augmented
  digits (digits MLP 64-128-10, one checkpoint, proj_dim 512: exact flat search over 100k × 512);
* small jobs: N ``mislabel`` jobs on a 1k-record index, submitted at once, until all succeed.

The data (model, 100k corpus, index) is built once into ``--workdir`` (default
/tmp/tda-service-bench, or $TDA_BENCH_DIR; ~1 min) and reused by later runs. The recorded run
(benchmarks/RESULTS.md, "Service"), on a quiet machine:

    python benchmarks/service_bench.py --requests 1000 --api-workers 1,2

``--api-workers 1,2`` measures one uvicorn process and two (each with its own batcher; /metrics
sums both). A quicker look: ``--n 20000 --requests 200 --jobs 5``. Search threads per query
come from $TDA_FAISS_THREADS (default 1); run with the BLAS variables unset or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

WORKDIR = Path(os.environ.get("TDA_BENCH_DIR", "/tmp/tda-service-bench"))
TENANT = "bench"


def augmented_corpus(path: Path, n: int, seed: int = 1) -> None:
    """n digits (±1 px shifts, intensity ×U(0.8, 1.2), noise σ=0.5), standardised like the
    training split of ``load_digits_split``; ids, features, label, and source metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))[:1000]
    mean, std = x[order].mean(0), x[order].std(0)
    std[std < 1e-8] = 1.0
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(x), n)
    images = x[pick].reshape(n, 8, 8)
    shifted = np.empty_like(images)
    dx, dy = rng.integers(-1, 2, n), rng.integers(-1, 2, n)
    for sx in (-1, 0, 1):
        for sy in (-1, 0, 1):
            mask = (dx == sx) & (dy == sy)
            block = np.roll(images[mask], (sy, sx), axis=(1, 2))
            if sy:
                block[:, 0 if sy == 1 else -1] = 0
            if sx:
                block[:, :, 0 if sx == 1 else -1] = 0
            shifted[mask] = block
    raw = np.clip(shifted.reshape(n, 64) * rng.uniform(0.8, 1.2, (n, 1))
                  + rng.normal(0, 0.5, (n, 64)), 0, 16)
    features = ((raw - mean) / std).astype(np.float32)
    pq.write_table(pa.table({
        "id": [f"aug-{i:07d}" for i in range(n)],
        "features": pa.array(list(features), type=pa.list_(pa.float32())),
        "label": y[pick].astype(np.int64),
        "source": [f"sklearn-digits/{int(i)}" for i in pick],
    }), path)


def prepare(workdir: Path, n: int, kind: str = "flat") -> tuple[np.ndarray, np.ndarray, str]:
    """Model card + 100k corpus + index of ``kind``, built once and reused by later runs."""
    from attribution.datasets import load_digits_split
    from indexer.build import build_index
    from service.core.config import Settings
    from service.demo import prepare_digits

    settings = Settings(data_dir=workdir / "data")
    files = settings.files_dir(TENANT)
    card = files / "digits" / "model.yaml"
    if not card.exists():
        prepare_digits(files, n_train=1000, n_test=300, checkpoints=1, hidden=128,
                       flip_fraction=0.0)
    corpus = files / f"aug-{n}.parquet"
    if not corpus.exists():
        augmented_corpus(corpus, n)
    name = f"digits{n // 1000}k" + ("" if kind == "flat" else "-" + kind.split("_")[0])
    started = time.time()
    built = build_index(card, corpus, name=name, root=settings.index_root(TENANT),
                        method="trak", method_args={"proj_dim": 512}, data_root=files,
                        dtype="float32", index_kind=kind, show_progress=True)
    if not built.reused:
        print(f"built {name}: {built.manifest['counts']['rows']} × {built.manifest['dim']} "
              f"({built.manifest['faiss']['kind']}) in {time.time() - started:.0f} s")
    _, test = load_digits_split(1000, 300, 0)
    return test.x.numpy(), test.y.numpy(), name


async def load(url: str, key: str, index: str, x: np.ndarray, y: np.ndarray, concurrency: int,
               requests: int) -> dict:
    """``requests`` top-k calls from ``concurrency`` keep-alive connections; each one's latency.

    A minimal HTTP/1.1 client on asyncio streams: a general-purpose client (httpx) spends more
    CPU per request than the server at high concurrency, and on 2 cores that would be measured
    as server latency.
    """
    host, port = url.removeprefix("http://").split(":")
    path = f"/v1/indexes/{index}/topk"
    bodies = [json.dumps({"examples": {"x": [x[j].tolist()], "y": [int(y[j])]}, "k": 10}).encode()
              for j in range(len(x))]
    latencies: list[float] = []
    errors = 0
    next_request = iter(range(requests))

    async def user() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in next_request:
                body = bodies[i % len(bodies)]
                head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
                t0 = time.perf_counter()
                writer.write(head.encode() + body)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "rps": requests / wall}


def batch_rows(url: str) -> tuple[float, float]:
    """(examples, batches) the server's top-k batcher has answered so far (from /metrics)."""
    import httpx

    totals = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for part in totals:
            if line.startswith(f"tda_topk_batch_rows_{part} "):
                totals[part] += float(line.split()[1])
    return totals["sum"], totals["count"]


def small_jobs(url: str, key: str, count: int) -> dict:
    """Build a 1k index by job, then ``count`` mislabel jobs on it at once, until all end."""
    from service.client import Client

    with Client(url, key) as tda:
        for kind, path in (("models", "digits/model.yaml"), ("corpora", "digits/train.parquet")):
            if not any(r["name"] == "digits" for r in tda.list(kind)):
                tda.register(kind, "digits", path)
        t0 = time.perf_counter()
        build = tda.wait(tda.submit("build_index", {
            "name": "digits1k", "model": "digits", "corpus": "digits",
            "method_args": {"proj_dim": 512}})["id"], timeout=900)
        build_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = [tda.submit("mislabel", {"index": "digits1k"})["id"] for _ in range(count)]
        states = [tda.wait(i, timeout=900, interval=0.1, raise_on_failure=False)["state"]
                  for i in ids]
        wall = time.perf_counter() - t0
    return {"build_seconds": build_seconds, "build_reused": build["result"]["summary"]["reused"],
            "jobs": count, "succeeded": states.count("succeeded"), "jobs_per_s": count / wall,
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="records in the top-k index")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--jobs", type=int, default=20, help="small jobs to submit")
    parser.add_argument("--kinds", default="flat", help="index kinds, e.g. flat,ivf_flat")
    parser.add_argument("--api-workers", default="1",
                        help="uvicorn processes to compare, e.g. 1,2 (TDA_API_WORKERS)")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    args = parser.parse_args()

    from service.harness import Harness

    indexes = [prepare(args.workdir, args.n, kind) for kind in args.kinds.split(",")]
    rows = []
    jobs = None
    for workers in (int(w) for w in args.api_workers.split(",")):
        harness = Harness(args.workdir / "data", rate_limit_per_minute=0, api_workers=workers)
        with harness:
            key = harness.key(TENANT)
            url = harness.url
            for x, y, index in indexes:
                asyncio.run(load(url, key, index, x, y, 4, 50))  # warm-up: index open, caches
                for c in (int(c) for c in args.concurrency.split(",")):
                    load_avg = os.getloadavg()[0]
                    before = batch_rows(url)
                    found = asyncio.run(load(url, key, index, x, y, c, args.requests))
                    after = batch_rows(url)
                    batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    rows.append({"index": index, "workers": workers, "load": load_avg,
                                 "batch": batch, **found})
            if jobs is None:
                jobs = small_jobs(url, key, args.jobs)
    print(f"\nHTTP top-k (TRAK, 1 checkpoint, proj_dim 512; k=10, 1 example/request, query "
          f"featurization included), {os.cpu_count()} cores\n")
    print("| index | API processes | concurrency | requests | errors | p50 ms | p99 ms | mean ms "
          "| requests/s | mean batch | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['workers']} | {r['concurrency']} | {r['requests']} | "
              f"{r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['mean']:.1f} | "
              f"{r['rps']:.1f} | {r['batch']:.1f} | {r['load']:.1f} |")
    assert jobs is not None
    print(f"\nsmall jobs: build_index of 1k records {jobs['build_seconds']:.1f} s"
          f"{' (reused)' if jobs['build_reused'] else ''}; {jobs['jobs']} mislabel jobs, "
          f"{jobs['succeeded']} succeeded, {jobs['jobs_per_s']:.2f} jobs/s "
          f"({jobs['wall']:.1f} s, 1 worker process)")


if __name__ == "__main__":
    main()
