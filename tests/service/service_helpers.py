"""Helpers shared by the service tests (imported by name: the directory is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.client import Client
from service.demo import DigitsData
from service.embedded import Embedded, free_port
from service.harness import Harness

PROBLEM = "application/problem+json"
TENANT, RIVAL = "acme", "rival"


@dataclass
class World:
    harness: Harness
    data: DigitsData
    admin: str  # acme: read, submit, admin
    reader: str  # acme: read only
    rival: str  # another tenant, all scopes
    index_job: dict

    @property
    def url(self) -> str:
        return self.harness.url

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def client(self, key: str | None = None) -> Client:
        return Client(self.url, key or self.admin)


def wait_idle(world: World, timeout: float = 120) -> None:
    """Until no job is queued or running (so stored state is still)."""
    store = world.harness.store()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get(k.rsplit(":", 1)[-1]) for k in store.redis.scan_iter(
            match=f"{store.prefix}job:*") if not k.endswith(":lease")]
        if all(j is None or j.done for j in jobs):
            return
        time.sleep(0.2)
    raise TimeoutError("jobs still running")


def snapshot(world: World) -> tuple[list[str], list[str]]:
    """Everything stored: files under the data dir (with sizes) and the job keys in Redis."""
    root = Path(world.harness.settings.data_dir)
    files = sorted(f"{p.relative_to(root)}:{p.stat().st_size}" for p in root.rglob("*")
                   if p.is_file() and "logs" not in p.parts and "redis" not in p.parts)
    store = world.harness.store()
    jobs = sorted(store.redis.scan_iter(match=f"{store.prefix}job*"))
    return files, jobs


@contextmanager
def extra_api(world: World, logs: Path, **settings: object) -> Iterator[Embedded]:
    """Another API process (no worker) on the world's Redis and data, with changed settings."""
    changed = world.harness.settings.model_copy(update={"port": free_port(), **settings})
    api = Embedded(changed, worker=False, logs=logs)
    api.start_api()
    try:
        api.wait_ready(60)
        yield api
    finally:
        api.stop()
