"""Errors as ``application/problem+json`` (RFC 9457), for every failure the API can produce.

Routes raise :class:`Problem` (or the engine's/indexer's input errors, mapped to 422); the
handlers installed by :func:`install` render FastAPI's validation errors, unknown routes,
unsupported methods and unexpected exceptions the same way, so a client parses one format.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.errors import PROBLEM_BASE

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error response: ``status``, a short ``title``, a ``detail`` that says what to fix."""

    def __init__(self, status: int, slug: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extensions = extensions


def problem_response(status: int, slug: str | None, title: str, detail: str, instance: str,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    """Render one problem document."""
    body = {
        "type": PROBLEM_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extensions,
    }
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def not_found(what: str, name: str, hint: str = "") -> Problem:
    """The 404 for a resource this tenant does not have (others' resources look the same)."""
    return Problem(404, "not-found", f"{what} {name!r} not found" + (f"; {hint}" if hint else ""))


def _validation_detail(errors: list[dict[str, Any]]
                       ) -> tuple[int, str, str, list[dict[str, Any]]]:
    """(status, slug, detail, errors by location) for FastAPI's validation errors."""
    listed = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        listed.append({"location": ".".join(loc), "message": err.get("msg", "invalid")})
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        where = first.get("ctx", {}).get("error", "")
        return 400, "malformed-json", (f"the request body is not valid JSON ({where}); "
                                       "send a JSON object"), listed
    not_an_object = {"model_attributes_type", "dict_type", "model_type", "missing"}
    if all(tuple(e.get("loc", ())) == ("body",) and e.get("type") in not_an_object
           for e in errors):
        return 400, "malformed-json", ("the request body must be a JSON object sent with "
                                       "'Content-Type: application/json'; see /docs"), listed
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in listed[:5])
    more = f" (and {len(listed) - 5} more)" if len(listed) > 5 else ""
    return 422, "invalid-request", f"the request does not match the schema: {summary}{more}", listed


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.slug, exc.title, exc.detail, request.url.path,
                                exc.headers, **exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, slug, detail, errors = _validation_detail(list(exc.errors()))
        return problem_response(status, slug, HTTPStatus(status).phrase, detail,
                                request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return problem_response(exc.status_code, None, HTTPStatus(exc.status_code).phrase, detail,
                                request.url.path, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal", "Internal Server Error",
                                "an unexpected error occurred; it was logged. Nothing was changed "
                                "by this request unless its response said so.", request.url.path)
