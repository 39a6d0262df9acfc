"""Shared fixtures: one small digits MLP and one built index per session (copied when mutated)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for indexer_fixtures, whatever the import mode

from indexer_fixtures import TRAK_ARGS, Setup, make_setup  # noqa: E402

from indexer.build import build_index  # noqa: E402

torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine


@pytest.fixture(scope="session")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def built_root(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index root holding 'digits' (TRAK, proj_dim 64, float32, shards of 100, flat)."""
    root = tmp_path_factory.mktemp("indexes")
    build_index(setup.card, setup.corpus, name="digits", root=root, method_args=TRAK_ARGS,
                shard_size=100, dtype="float32", show_progress=False, recall_queries=50)
    return root


@pytest.fixture
def fresh_root(built_root: Path, tmp_path: Path) -> Path:
    """A private copy of the built index root, for tests that change or damage it."""
    root = tmp_path / "indexes"
    shutil.copytree(built_root, root)
    return root
