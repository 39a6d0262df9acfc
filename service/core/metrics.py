"""Prometheus metrics (``/metrics``): request counts and latency per route, jobs, queue depths."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "tda_http_requests_total", "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "tda_http_request_seconds", "HTTP request latency by route",
    ["route", "method"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_SUBMITTED = Counter("tda_jobs_submitted_total", "Jobs accepted, by kind", ["kind"])
TOPK_QUERIES = Counter("tda_topk_examples_total", "Examples answered by top-k, by index",
                       ["index"])


class MetricsMiddleware:
    """Counts and times every request under its route template (not the raw path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = _route_of(scope)
            method = scope.get("method", "")
            REQUESTS.labels(route, method, str(status)).inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)


def _route_of(scope: Scope) -> str:
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


class QueueCollector(Collector):
    """Reads queue depths and job counts at scrape time (nothing to keep in sync)."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("tda_queue_depth", "Jobs waiting per Celery queue", labels=["queue"])
        try:
            for queue, depth in self.read().items():
                gauge.add_metric([queue], depth)
        except Exception:  # a scrape must not fail because Redis is briefly away
            pass
        yield gauge


_collector: QueueCollector | None = None


def register_queue_reader(read: Callable[[], dict[str, int]]) -> None:
    """Point the (single, process-wide) queue collector at the current app's Redis."""
    global _collector
    if _collector is None:
        _collector = QueueCollector(read)
        REGISTRY.register(_collector)
    else:
        _collector.read = read


def metrics_response(_: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
