"""Prometheus metrics (``/metrics``): request counts and latency per route, jobs, queue depths.

With several API processes (``TDA_API_WORKERS`` > 1, or any process manager) each process
counts in its own files under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode; the variable must be set before the processes start) and ``/metrics``, whichever process
answers, sums them all. The directory is emptied when the system starts
(:func:`reset_multiprocess_dir`) and an API process marks its files dead when it stops.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
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
TOPK_BATCH_ROWS = Histogram("tda_topk_batch_rows", "Examples featurized and searched together",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


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
    """The matched route's template (routing leaves the route in the scope), or "unmatched"."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class QueueCollector(Collector):
    """Reads queue depths and ended-job totals from Redis at scrape time: one truth for every
    API process and every worker, wherever they run (nothing to keep in sync)."""

    def __init__(self, read: Callable[[], dict[str, int]],
                 ended: Callable[[], dict[tuple[str, str], int]] | None = None) -> None:
        self.read, self.ended = read, ended

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        gauge = GaugeMetricFamily("tda_queue_depth", "Jobs waiting per Celery queue", labels=["queue"])
        ended = CounterMetricFamily("tda_jobs_ended", "Jobs ended, by kind and final state",
                                    labels=["kind", "state"])
        try:  # a scrape must not fail because Redis is briefly away
            for queue, depth in self.read().items():
                gauge.add_metric([queue], depth)
            for (kind, state), total in (self.ended() if self.ended else {}).items():
                ended.add_metric([kind, state], total)
        except Exception:
            pass
        yield gauge
        yield ended


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_collector: QueueCollector | None = None


def multiprocess_dir() -> Path | None:
    """The multiprocess directory this process counts in, or None (one registry in memory)."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def reset_multiprocess_dir(directory: Path) -> None:
    """Empty (or create) the directory before the API processes start: counts from a previous
    run must not be summed into this one."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def mark_process_dead() -> None:
    """Drop this process's live gauges from the sums (its counters and histograms stay)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid())


def register_queue_reader(read: Callable[[], dict[str, int]],
                          ended: Callable[[], dict[tuple[str, str], int]] | None = None) -> None:
    """Point the (single, process-wide) queue collector at the current app's Redis."""
    global _collector
    if _collector is None:
        _collector = QueueCollector(read, ended)
        REGISTRY.register(_collector)
    else:
        _collector.read, _collector.ended = read, ended


def metrics_response(_: Request) -> Response:
    """This process's metrics or, in multiprocess mode, every API process's summed."""
    if multiprocess_dir() is None:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if _collector is not None:  # queue depths are read from Redis, not counted per process
        registry.register(_collector)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
