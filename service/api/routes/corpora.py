"""/v1/corpora: register a corpus file from your file area, list, inspect, delete."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.api.deps import Admin, Reader, ServicesDep, registry
from service.core.problems import Problem, not_found
from service.registry import describe_corpus, relative
from service.schemas.common import PROBLEM_RESPONSES, Deleted
from service.schemas.registry import CorpusOut, RegisterRequest

router = APIRouter(prefix="/v1/corpora", tags=["corpora"], responses=PROBLEM_RESPONSES)


def _out(record: dict, services: ServicesDep, tenant: str) -> CorpusOut:
    files = services.settings.files_dir(tenant)
    return CorpusOut(**{**record, "path": relative(record["path"], files)})


@router.get("", response_model=list[CorpusOut])
def list_corpora(services: ServicesDep, who: Reader) -> list[CorpusOut]:
    return [_out(r, services, who.tenant) for r in registry(services, who, "corpora").list()]


@router.post("", response_model=CorpusOut, status_code=status.HTTP_201_CREATED)
def register_corpus(body: RegisterRequest, services: ServicesDep, who: Admin) -> CorpusOut:
    """Check the file's format and ids, fingerprint it, and record it under ``name``."""
    corpora = registry(services, who, "corpora")
    if corpora.get(body.name) is not None:
        raise Problem(409, "exists", f"corpus {body.name!r} is already registered; delete it "
                      "first or choose another name")
    path = corpora.resolve(body.path, "corpus")
    record = corpora.put(body.name, describe_corpus(path))
    return _out(record, services, who.tenant)


@router.get("/{name}", response_model=CorpusOut)
def get_corpus(name: str, services: ServicesDep, who: Reader) -> CorpusOut:
    record = registry(services, who, "corpora").get(name)
    if record is None:
        raise not_found("corpus", name, "list them with GET /v1/corpora")
    return _out(record, services, who.tenant)


@router.delete("/{name}", response_model=Deleted)
def delete_corpus(name: str, services: ServicesDep, who: Admin) -> Deleted:
    """Remove the registration (the file stays in your file area)."""
    if not registry(services, who, "corpora").delete(name):
        raise not_found("corpus", name)
    return Deleted(name=name)
