"""/v1/files: your file area — upload model cards, checkpoints and corpora, list, delete.

``PUT /v1/files/<path>`` streams the raw body (``application/octet-stream``) to a temporary file
and renames it into place, so a broken upload never replaces a good file. Registering a model
or corpus then refers to the uploaded path.
"""

from __future__ import annotations

import os
import uuid

from fastapi import APIRouter, Request

from service.api.deps import Admin, Reader, ServicesDep
from service.core.problems import Problem, not_found
from service.registry import relative, resolve_in
from service.schemas.common import PROBLEM_RESPONSES, Deleted
from service.schemas.registry import FileOut

router = APIRouter(prefix="/v1/files", tags=["files"], responses=PROBLEM_RESPONSES)


@router.get("", response_model=list[FileOut])
def list_files(services: ServicesDep, who: Reader) -> list[FileOut]:
    root = services.settings.files_dir(who.tenant)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        found.append(FileOut(path=relative(path, root), bytes=stat.st_size, modified=stat.st_mtime))
    return found


@router.put(
    "/{path:path}", response_model=FileOut, status_code=201,
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}, "required": True}},
)
async def upload_file(path: str, request: Request, services: ServicesDep, who: Admin) -> FileOut:
    """Store the request body at ``path`` in your file area (replacing an existing file)."""
    root = services.settings.files_dir(who.tenant)
    target = resolve_in(root, path, "upload path")
    if target == root.resolve() or any(part.startswith(".") for part in target.relative_to(
            root.resolve()).parts):
        raise Problem(422, "invalid-path", f"upload path {path!r} must name a file whose parts "
                      "do not start with '.'")
    if target.is_dir():
        raise Problem(409, "exists", f"{path!r} is a directory in your file area")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.upload")
    try:
        with open(staging, "wb") as handle:
            async for chunk in request.stream():
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    stat = target.stat()
    return FileOut(path=relative(target, root), bytes=stat.st_size, modified=stat.st_mtime)


@router.delete("/{path:path}", response_model=Deleted)
def delete_file(path: str, services: ServicesDep, who: Admin) -> Deleted:
    root = services.settings.files_dir(who.tenant)
    target = resolve_in(root, path, "path")
    if not target.is_file():
        raise not_found("file", path, "list your files with GET /v1/files")
    target.unlink()
    return Deleted(name=relative(target, root))
