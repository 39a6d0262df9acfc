"""/v1/indexes: list, inspect, register (from your file area), delete, and top-k queries."""

from __future__ import annotations

import shutil
import uuid

from fastapi import APIRouter, status

from indexer.index import AttributionIndex
from indexer.layout import index_dir, locked, publish, resolve_version, write_current
from service.api.deps import Admin, Reader, ServicesDep
from service.core.metrics import TOPK_QUERIES
from service.core.problems import Problem, not_found
from service.registry import resolve_in
from service.schemas.common import PROBLEM_RESPONSES, Deleted
from service.schemas.indexes import TopKRequest, TopKResponse
from service.schemas.registry import IndexOut, RegisterRequest
from service.topk import answer

router = APIRouter(prefix="/v1/indexes", tags=["indexes"], responses=PROBLEM_RESPONSES)


def _out(index: AttributionIndex, full: bool = False) -> IndexOut:
    m = index.manifest
    return IndexOut(name=index.name, version=index.version, method=m["method"]["name"],
                    records=index.size, dim=index.dim, kind=m["faiss"]["kind"],
                    built_at=None, manifest=m if full else None)


@router.get("", response_model=list[IndexOut])
def list_indexes(services: ServicesDep, who: Reader) -> list[IndexOut]:
    found = []
    for name in services.indexes.names(who.tenant):
        try:
            found.append(_out(services.indexes.get(who.tenant, name)))
        except Exception:  # a damaged index is listed by GET /v1/indexes/{name} with its error
            continue
    return found


@router.get("/{name}", response_model=IndexOut)
def get_index(name: str, services: ServicesDep, who: Reader) -> IndexOut:
    """The current version with its full manifest (method, fingerprints, counts, recall)."""
    return _out(services.indexes.get(who.tenant, name), full=True)


@router.post("", response_model=IndexOut, status_code=status.HTTP_201_CREATED)
def register_index(body: RegisterRequest, services: ServicesDep, who: Admin) -> IndexOut:
    """Copy an index built offline (``tda index build``) from your file area, as a new version."""
    source = resolve_version(resolve_in(services.settings.files_dir(who.tenant), body.path,
                                        "index"), None)
    found = AttributionIndex.open(source)  # checks the manifest and files before copying
    found.close()
    if found.name != body.name:
        raise Problem(422, "invalid-request", f"the index at {body.path!r} is named "
                      f"{found.name!r}; register it under that name")
    directory = index_dir(services.settings.index_root(who.tenant), body.name)
    staging = directory / "staging" / f"register-{uuid.uuid4().hex}"
    shutil.copytree(source, staging)
    try:
        with locked(directory):
            write_current(directory, publish(directory, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    services.indexes.evict(who.tenant, body.name)
    return _out(services.indexes.get(who.tenant, body.name))


@router.delete("/{name}", response_model=Deleted)
def delete_index(name: str, services: ServicesDep, who: Admin) -> Deleted:
    """Delete every version of the index (moved aside atomically, then removed)."""
    directory = services.indexes.directory(who.tenant, name)
    if not directory.is_dir():
        raise not_found("index", name)
    trash = directory.with_name(f".deleted-{name}-{uuid.uuid4().hex[:8]}")
    directory.rename(trash)
    services.indexes.evict(who.tenant, name)
    shutil.rmtree(trash, ignore_errors=True)
    return Deleted(name=name)


@router.post("/{name}/topk", response_model=TopKResponse)
async def topk(name: str, body: TopKRequest, services: ServicesDep, who: Reader) -> TopKResponse:
    """For each example, the training records with the highest (and lowest) attribution."""
    response = await answer(services.indexes.batcher(who.tenant, name), body,
                      services.settings.max_topk_k, services.settings.max_topk_examples,
                      services.settings.query_timeout_seconds)
    TOPK_QUERIES.labels(name).inc(len(body.examples))
    return response
