"""The FastAPI application: routers, problem+json handlers, body limit, metrics, lifespan."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from attribution.errors import AttributionError
from indexer.errors import IndexerError, IndexNotFoundError
from service.api.routes import (
    corpora,
    files,
    groups,
    health,
    indexes,
    jobs,
    models,
    provenance,
)
from service.core import problems
from service.core.config import Settings, get_settings
from service.core.limits import BodyLimit
from service.core.metrics import MetricsMiddleware, mark_process_dead, register_queue_reader
from service.registry import PathOutsideRoot
from service.state import Services

DESCRIPTION = """Training Data Attribution as a service: which training examples made the model
do this? Top-k proponents/opponents from published indexes, and jobs for exact attribution,
valuation, mislabel detection, evaluation (LDS) and index builds.

Authenticate with `Authorization: Bearer <API key>`. Errors are `application/problem+json`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; Redis and indexes are opened in the lifespan (not at import)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        torch.set_num_threads(settings.torch_threads)
        services = Services.open(settings)
        app.state.services = services
        register_queue_reader(services.queue_depths, services.jobs.ended_totals)
        if settings.preload_indexes:
            threading.Thread(target=services.indexes.preload, daemon=True,
                             name="preload-indexes").start()
        else:
            services.indexes.preload_done.set()
        yield
        services.close()
        mark_process_dead()

    from service import __version__

    app = FastAPI(title="tdaserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    for router in (health.router, models.router, corpora.router, files.router,
                   indexes.router, groups.router, jobs.router, provenance.router):
        app.include_router(router)
    problems.install(app)
    _map_domain_errors(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       upload_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware)
    return app


def _map_domain_errors(app: FastAPI) -> None:
    """The engine's and indexer's input errors are the client's to fix: 4xx, never 500."""

    def handler(status: int, slug: str):  # type: ignore[no-untyped-def]
        async def handle(request, exc):  # type: ignore[no-untyped-def]
            return problems.problem_response(status, slug, problems.HTTPStatus(status).phrase,
                                             str(exc), request.url.path)
        return handle

    app.add_exception_handler(PathOutsideRoot, handler(403, "path-outside-data-root"))
    app.add_exception_handler(IndexNotFoundError, handler(404, "not-found"))
    app.add_exception_handler(IndexerError, handler(422, "invalid-input"))
    app.add_exception_handler(AttributionError, handler(422, "invalid-input"))
    app.add_exception_handler(TimeoutError, handler(504, "timeout"))
