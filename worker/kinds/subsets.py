"""``subsets``: retrain the model on K random training subsets (a seeded ``SubsetPlan``) and
record every test example's output f and loss L — the ground truth of LDS evaluation and the
supervision of AirRep training.

The K subsets are split into chunks. The job sends one Celery task per unfinished chunk (a
group), so idle worker processes retrain in parallel, and works through unclaimed chunks itself
meanwhile: with one process the job alone does everything, with more they share it. A chunk is
claimed in Redis while it is computed and its outcome is stored as a file keyed by (job id,
chunk), so a redelivered or restarted job, or a chunk task delivered twice, skips finished
chunks. Each subset's outcome depends on (plan, k) alone, so the stacked result is bitwise the
same however the chunks were shared, interrupted or redone. Progress = finished chunks / chunks.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from worker.config import WorkerSettings
from worker.errors import JobCancelled, JobLost
from worker.jobstore import JobStore
from worker.kinds.common import inline_examples, load_model_and_corpus
from worker.results import Result
from worker.runner import JobContext

DEFAULT_CHUNK = 4  # subsets per chunk: small enough to share, large enough to amortise loading
_POLL_SECONDS = 0.2


@dataclass
class Retraining:
    """Everything one subset's retraining needs, as the job's parameters define it."""

    plan: Any  # attribution.evaluate.SubsetPlan
    loaded: Any  # worker.kinds.common.Loaded: card, engine task, corpus
    test: Any  # engine Examples
    config: Any  # attribution.training.TrainConfig
    n_seeds: int
    chunk_size: int

    def make_model(self, seed: int) -> Any:
        from attribution import models

        arch = self.loaded.card.architecture
        return models.build(arch.builtin, **{**arch.config, "seed": seed})

    @property
    def task(self) -> type:
        return type(self.loaded.task)

    @property
    def train(self) -> Any:
        return self.loaded.corpus.examples()

    @property
    def chunks(self) -> list[range]:
        k, size = self.plan.n_subsets, self.chunk_size
        return [range(a, min(a + size, k)) for a in range(0, k, size)]

    def meta(self) -> dict[str, Any]:
        """What ``retrain_on_subsets`` records, so results from either path read the same."""
        return {"plan": self.plan.to_dict(), "config": self.config.to_dict(),
                "n_seeds": self.n_seeds}


def retraining(ctx: JobContext) -> Retraining:
    """The retraining a ``subsets`` or ``evaluate`` job asks for (built-in architectures only)."""
    from attribution import evaluate, training
    from indexer.errors import IndexerError

    p = ctx.params
    loaded = load_model_and_corpus(ctx)
    arch = loaded.card.architecture
    if not arch.builtin:
        raise IndexerError("retraining on subsets trains the model from scratch, which needs a "
                           "built-in architecture (mlp, logistic_regression, small_cnn, tiny_gpt2)")
    overrides = {"epochs": p["epochs"]} if p.get("epochs") else {}
    plan = evaluate.SubsetPlan(len(loaded.corpus), p.get("alpha", 0.5), p["num_subsets"],
                               p.get("seed", 0))
    return Retraining(plan, loaded, inline_examples(ctx, "test_path", loaded.card, loaded.corpus),
                      training.default_config(arch.builtin, **overrides), p.get("n_seeds", 1),
                      p.get("chunk_size") or DEFAULT_CHUNK)


# --- chunk files and claims ----------------------------------------------------------------------
def work_dir(settings: WorkerSettings, tenant: str, job_id: str) -> Path:
    """Where a job's finished chunks wait until its result is assembled (a dot-folder named
    after the job, which ``worker.expiry`` removes once the job has ended)."""
    return settings.results_dir(tenant) / f".{job_id}.subsets"


def chunk_path(directory: Path, chunk: int) -> Path:
    return directory / f"chunk-{chunk:05d}.npz"


_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Claim:
    """A chunk being computed: a Redis key that expires unless its holder renews it, so the
    chunk of a killed worker is free again after ``seconds``."""

    def __init__(self, store: JobStore, job_id: str, chunk: int, seconds: int) -> None:
        self.redis, self.seconds = store.redis, seconds
        self.key = f"{store.key(job_id)}:chunk:{chunk}"
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()

    def acquire(self) -> bool:
        if not self.redis.set(self.key, self.token, nx=True, ex=self.seconds):
            return False
        threading.Thread(target=self._renew, daemon=True, name=f"claim-{self.key}").start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.redis.eval(_RENEW, 1, self.key, self.token, self.seconds)
            except Exception:  # a Redis hiccup: the next renewal retries
                continue

    def release(self) -> None:
        self._stop.set()
        self.redis.eval(_RELEASE, 1, self.key, self.token)


def compute_chunk(setup: Retraining, chunk: int, path: Path, by: str,
                  check: Any = lambda: None) -> None:
    """Retrain the chunk's subsets and store their outcomes atomically at ``path``.

    ``check()`` runs before each subset (it raises to stop: cancellation, a lost lease)."""
    from attribution.evaluate import SubsetResults, retrain_subset

    outcomes, train = [], setup.train
    for k in setup.chunks[chunk]:
        check()
        outcomes.append(retrain_subset(setup.plan, k, setup.make_model, setup.task, train,
                                       setup.test, setup.config, setup.n_seeds))
    SubsetResults.from_outcomes(outcomes, {**setup.meta(), "chunk": chunk, "by": by}).save(path)


def _stack(setup: Retraining, directory: Path) -> tuple[Any, dict[str, int]]:
    """The chunks' outcomes in subset order, and how many chunks the job and its tasks did."""
    from attribution.evaluate import SubsetResults

    parts = [SubsetResults.load(chunk_path(directory, i)) for i in range(len(setup.chunks))]
    stacked = SubsetResults(np.concatenate([p.masks for p in parts]),
                            np.concatenate([p.outputs for p in parts]),
                            np.concatenate([p.losses for p in parts]),
                            np.concatenate([p.subset_ids for p in parts]), setup.meta())
    by = [p.meta.get("by", "job") for p in parts]
    return stacked, {"job": by.count("job"), "tasks": by.count("task")}


# --- the job side --------------------------------------------------------------------------------
def retrain_in_chunks(ctx: JobContext, setup: Retraining, start: float, stop: float
                      ) -> tuple[Any, dict[str, Any]]:
    """Retrain on every subset of the plan, chunk by chunk, sharing the chunks with parallel
    chunk tasks; returns the stacked ``SubsetResults`` and a summary of how it was made."""
    from worker.kinds.queues import queue_for
    from worker.tasks import SUBSET_CHUNK, app

    directory = work_dir(ctx.settings, ctx.tenant, ctx.job_id)
    directory.mkdir(parents=True, exist_ok=True)
    total = len(setup.chunks)
    pending = [i for i in range(total) if not chunk_path(directory, i).exists()]
    resumed = total - len(pending)
    if len(pending) > 1:
        from celery import group

        queue = ctx.settings.queues[queue_for(ctx.kind, ctx.params)]
        group(app.signature(SUBSET_CHUNK, args=(ctx.job_id, i), queue=queue)
              for i in pending[1:]).apply_async()
    try:
        _work_through(ctx, setup, directory, pending, start, stop)
    except JobLost:
        raise  # another attempt owns the job and its chunks now
    except Exception:  # cancelled or failed: the job ends and is not resumed
        shutil.rmtree(directory, ignore_errors=True)
        raise
    results, computed = _stack(setup, directory)
    shutil.rmtree(directory, ignore_errors=True)
    return results, {"chunks": total, "chunk_size": setup.chunk_size, "resumed_chunks": resumed,
                     "computed_by": computed}


def _work_through(ctx: JobContext, setup: Retraining, directory: Path, pending: list[int],
                  start: float, stop: float) -> None:
    """Compute unclaimed chunks until every chunk file exists; report progress after each."""
    from worker.tasks import job_store

    store, total = job_store(), len(setup.chunks)
    while pending:
        ctx.progress(start + (stop - start) * (total - len(pending)) / total,
                     f"retrained {total - len(pending)}/{total} chunks of subsets")
        for i in pending:
            claim = Claim(store, ctx.job_id, i, ctx.settings.lease_seconds)
            if chunk_path(directory, i).exists() or not claim.acquire():
                continue
            try:
                if not chunk_path(directory, i).exists():  # done between the look and the claim
                    compute_chunk(setup, i, chunk_path(directory, i), "job",
                                  lambda: ctx.report(None, ""))  # cancel / lost lease
            finally:
                claim.release()
            break  # report progress after every chunk
        else:
            time.sleep(_POLL_SECONDS)  # the rest are being computed by chunk tasks
        pending = [i for i in pending if not chunk_path(directory, i).exists()]


def run(ctx: JobContext) -> Result:
    setup = retraining(ctx)
    results, how = retrain_in_chunks(ctx, setup, 0.05, 0.99)
    table = pa.table({"subset": results.subset_ids, "size": results.masks.sum(1),
                      "mean_output": results.outputs.mean(1), "mean_loss": results.losses.mean(1)})
    arrays = {"masks": results.masks, "outputs": results.outputs, "losses": results.losses,
              "subset_ids": results.subset_ids}
    summary = {**results.meta, **how, "train": int(setup.plan.n_train),
               "test": int(len(setup.test))}
    return Result(table, arrays, summary)


def subsets_job_problem(job: Any, tenant: str, params: dict[str, Any]
                        ) -> tuple[int, str, str] | None:
    """Why ``job`` cannot stand in for retraining in an ``evaluate`` job of ``tenant`` with the
    resolved ``params``: (HTTP status, problem type, detail), or None when it can. Checked when
    the evaluate job is submitted and again when it runs."""
    job_id = params["subsets_job"]
    if job is None or job.tenant != tenant:
        return (404, "not-found", f"no subsets job {job_id!r}: submit one (kind 'subsets') and "
                "pass its id")
    if job.kind != "subsets":
        return (422, "invalid-subsets-job", f"job {job_id} is a {job.kind!r} job, not a subsets "
                "job: pass the id of a job of kind 'subsets'")
    if job.state != "succeeded" or job.result is None:
        return (422, "subsets-job-not-finished", f"subsets job {job_id} is {job.state}; wait "
                "until it has succeeded")
    for key, what in (("model_path", "model"), ("corpus_path", "corpus"), ("test_path", "test")):
        if job.params.get(key) != params.get(key):
            return (422, "subsets-job-mismatch", f"subsets job {job_id} retrained with another "
                    f"{what}; evaluate with the model, corpus and test examples it used")
    return None


def finished_results(ctx: JobContext, job_id: str) -> Any:
    """The ``SubsetResults`` of this tenant's finished ``subsets`` job ``job_id``, checked to be
    for the same model, corpus and test examples as ``ctx`` (so LDS can reuse it)."""
    from attribution.evaluate import SubsetResults
    from indexer.errors import IndexerError
    from worker.tasks import job_store

    job = job_store().get(job_id) if len(job_id) <= 64 else None
    problem = subsets_job_problem(job, ctx.tenant, {**ctx.params, "subsets_job": job_id})
    if problem is not None:
        raise IndexerError(problem[2])
    directory, summary = Path(job.result["path"]), job.result["summary"]
    arrays = [np.load(directory / f"{name}.npy", allow_pickle=False)
              for name in ("masks", "outputs", "losses", "subset_ids")]
    return SubsetResults(*arrays, meta={k: summary[k] for k in ("plan", "config", "n_seeds")})


# --- the chunk task side -------------------------------------------------------------------------
def run_chunk(store: JobStore, settings: WorkerSettings, job_id: str, chunk: int) -> str:
    """One chunk task: compute chunk ``chunk`` of job ``job_id`` unless it is done, claimed, or
    the job has ended. Returns what happened ('computed', 'done', 'busy', 'skipped')."""
    job = store.get(job_id)
    if job is None or job.done or job.cancel_requested:
        return "skipped"
    directory = work_dir(settings, job.tenant, job_id)
    path = chunk_path(directory, chunk)
    if not directory.is_dir():  # the job has assembled its result (or never started)
        return "skipped"
    if path.exists():
        return "done"
    claim = Claim(store, job_id, chunk, settings.lease_seconds)
    if not claim.acquire():
        return "busy"

    def check() -> None:
        current = store.get(job_id)
        if current is None or current.done or current.cancel_requested:
            raise JobCancelled(job_id)

    try:
        if path.exists():  # finished between the look and the claim
            return "done"
        ctx = JobContext(job_id, job.tenant, job.kind, job.params, settings,
                         lambda fraction, stage: None)
        compute_chunk(retraining(ctx), chunk, path, "task", check)
    except JobCancelled:
        return "skipped"
    except OSError:  # the job removed its work dir meanwhile: it no longer needs this chunk
        if directory.is_dir():
            raise
        return "skipped"
    finally:
        claim.release()
    return "computed"
