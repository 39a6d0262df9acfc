"""/healthz (the process answers), /readyz (Redis, workers, indexes), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import ServicesDep
from service.core.metrics import metrics_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: 200 whenever the process can answer."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the body says why"}})
def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: Redis answers, at least one worker is alive, indexes are loaded."""
    checks: dict[str, Any] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
        workers = services.jobs.workers()
        checks["workers"] = {"alive": len(workers),
                             "queues": sorted({q for w in workers for q in w.get("queues", [])})}
        checks["queues"] = services.queue_depths()
    except Exception as err:  # noqa: BLE001 - report, don't fail
        checks["redis"] = f"unreachable: {type(err).__name__}"
        workers = []
    cache = services.indexes
    checks["indexes"] = {"loaded": cache.loaded(), "preloaded": cache.preload_done.is_set(),
                         "errors": cache.preload_errors}
    ready = checks["redis"] == "ok" and bool(workers) and cache.preload_done.is_set()
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return metrics_response(request)
