"""Submitting jobs: check and resolve the request, store inputs, create the record, enqueue.

The API resolves every name (model, corpus, index) to a path in the tenant's area before the
job exists, so a worker only executes: it never decides what a tenant may read. Inline examples
are written to a content-addressed ``.npz`` (never into Redis) before the record is created;
the file for a given body is immutable, so a replayed or conflicting request cannot change the
inputs of an existing job.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from indexer.layout import check_name
from indexer.paths import fsync_dir
from service.core.metrics import JOBS_SUBMITTED
from service.core.problems import Problem, not_found
from service.core.security import Principal
from service.registry import Registry
from service.state import Services
from service.topk import examples_arrays
from worker.jobstore import Job, job_id_for, request_hash
from worker.kinds.queues import queue_for

_EXAMPLE_FIELDS = {"attribution": ["examples"], "valuation": ["validation"], "evaluate": ["test"],
                   "subsets": ["test"]}


def submit(services: Services, who: Principal, job: BaseModel, idempotency_key: str | None
           ) -> tuple[Job, bool]:
    """Create (or find, for a replayed Idempotency-Key) the job; returns ``(job, created)``."""
    body = job.model_dump(mode="json")
    digest = request_hash(body)
    job_id = job_id_for(who.tenant, idempotency_key)
    existing = services.jobs.get(job_id) if idempotency_key else None
    if existing is not None:
        return _replay(existing, digest), False
    kind, params = body["kind"], dict(body["params"])
    if sum(len(params[f]["x"]) for f in _EXAMPLE_FIELDS.get(kind, [])) > \
            services.settings.max_job_examples:
        raise Problem(422, "invalid-request", f"a job takes at most "
                      f"{services.settings.max_job_examples} inline examples (TDA_MAX_JOB_EXAMPLES)")
    resolved = resolve(services, who, kind, params)
    encoded = [(field, encode_examples(services, who, field, params.pop(field)))
               for field in _EXAMPLE_FIELDS.get(kind, [])]
    for field, (path, _) in encoded:
        resolved[f"{field}_path"] = str(path)
        resolved.pop(field, None)
    if kind == "evaluate" and resolved.get("subsets_job"):
        check_subsets_job(services, who, resolved)
    for _, (path, data) in encoded:  # only once the request is known to be good
        write_once(path, data)
    queue = services.settings.queues[queue_for(kind, resolved)]
    created, _ = services.jobs.create(job_id, who.tenant, kind, queue, resolved, digest)
    if not created:  # a concurrent request with the same key won the race
        found = services.jobs.get(job_id)
        assert found is not None
        return _replay(found, digest), False
    from worker.tasks import enqueue

    enqueue(job_id, queue)
    JOBS_SUBMITTED.labels(kind).inc()
    found = services.jobs.get(job_id)
    assert found is not None
    return found, True


def _replay(job: Job, digest: str) -> Job:
    """The existing job for a replayed key, if the body is the same one."""
    if job.request_hash != digest:
        raise Problem(422, "idempotency-key-reused",
                      "this Idempotency-Key was already used for a different request body; "
                      "use a new key for a new request (or resend the original body)")
    return job


def resolve(services: Services, who: Principal, kind: str, params: dict[str, Any]
            ) -> dict[str, Any]:
    """Replace names by checked paths in the tenant's area (404 for unknown names)."""
    tenant_dir = services.settings.tenant_dir(who.tenant)
    resolved = dict(params)
    if params.get("model") is not None:
        resolved["model_path"] = _registered(Registry(tenant_dir, "models"), params["model"])
    if params.get("corpus") is not None:
        corpora = Registry(tenant_dir, "corpora")
        resolved["corpus_path"] = _registered(corpora, params["corpus"])
        _check_width(params, (corpora.get(params["corpus"]) or {}).get("input_size"))
    if params.get("index") is not None:
        index = services.indexes.get(who.tenant, params["index"])  # 404 when unknown
        resolved["index_version"] = index.version
    if kind == "build_index":
        check_name(params["name"])
    return resolved


def _check_width(params: dict[str, Any], size: int | None) -> None:
    """Refuse inline examples whose rows do not have the corpus's number of input values."""
    for field in ("examples", "validation", "test"):
        rows = (params.get(field) or {}).get("x") or []
        widths = {len(r) for r in rows}
        if size is not None and widths and widths != {size}:
            raise Problem(422, "invalid-examples", f"{field}.x rows have {sorted(widths)} values "
                          f"but the corpus's inputs have {size}; send rows like the corpus's")


def _registered(registry: Registry, name: str) -> str:
    record = registry.get(name)
    if record is None:
        raise not_found(registry.kind[:-1] if registry.kind != "corpora" else "corpus", name,
                        f"register it with POST /v1/{registry.kind}")
    if not Path(record["path"]).is_file():
        raise Problem(422, "missing-file", f"{registry.kind[:-1]} {name!r} was registered but its "
                      "file is gone; upload it again or delete the registration")
    return record["path"]


def check_subsets_job(services: Services, who: Principal, resolved: dict[str, Any]) -> None:
    """404 for an unknown subsets job (or another tenant's), 422 for a job of another kind, one
    not succeeded, or one retrained with another model, corpus or test set."""
    from worker.kinds.subsets import subsets_job_problem

    job = services.jobs.get(resolved["subsets_job"])
    problem = subsets_job_problem(job, who.tenant, resolved)
    if problem is not None:
        raise Problem(*problem)


def encode_examples(services: Services, who: Principal, field: str, examples: dict[str, Any]
                    ) -> tuple[Path, bytes]:
    """Inline examples as ``.npz`` bytes and the content-addressed path they belong at."""
    x, y = examples_arrays(examples["x"], examples.get("y"), field)
    buffer = io.BytesIO()
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    directory = services.settings.tenant_dir(who.tenant) / "inputs"
    return directory / f"{hashlib.sha256(data).hexdigest()}.npz", data


def write_once(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically unless it exists (its name is its content hash)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
