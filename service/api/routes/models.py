"""/v1/models: register a model card from your file area, list, inspect, delete."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.api.deps import Admin, Reader, ServicesDep, registry
from service.core.problems import Problem, not_found
from service.registry import describe_model, relative
from service.schemas.common import PROBLEM_RESPONSES, Deleted
from service.schemas.registry import ModelOut, RegisterRequest

router = APIRouter(prefix="/v1/models", tags=["models"], responses=PROBLEM_RESPONSES)


def _out(record: dict, services: ServicesDep, tenant: str) -> ModelOut:
    files = services.settings.files_dir(tenant)
    return ModelOut(**{**record, "path": relative(record["path"], files)})


@router.get("", response_model=list[ModelOut])
def list_models(services: ServicesDep, who: Reader) -> list[ModelOut]:
    return [_out(r, services, who.tenant) for r in registry(services, who, "models").list()]


@router.post("", response_model=ModelOut, status_code=status.HTTP_201_CREATED)
def register_model(body: RegisterRequest, services: ServicesDep, who: Admin) -> ModelOut:
    """Validate the card (every problem reported by field) and record it under ``name``."""
    models = registry(services, who, "models")
    if models.get(body.name) is not None:
        raise Problem(409, "exists", f"model {body.name!r} is already registered; delete it first "
                      "or choose another name")
    path = models.resolve(body.path, "model card")
    record = models.put(body.name, describe_model(path, models.files_root))
    return _out(record, services, who.tenant)


@router.get("/{name}", response_model=ModelOut)
def get_model(name: str, services: ServicesDep, who: Reader) -> ModelOut:
    record = registry(services, who, "models").get(name)
    if record is None:
        raise not_found("model", name, "list them with GET /v1/models")
    return _out(record, services, who.tenant)


@router.delete("/{name}", response_model=Deleted)
def delete_model(name: str, services: ServicesDep, who: Admin) -> Deleted:
    """Remove the registration (the files stay in your file area)."""
    if not registry(services, who, "models").delete(name):
        raise not_found("model", name)
    return Deleted(name=name)
