"""kill -9 of a real build process: the served version survives and the rerun resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from indexer_fixtures import TRAK_ARGS, Setup

from indexer.build import build_index
from indexer.index import AttributionIndex

REPO = Path(__file__).resolve().parents[2]
OPTIONS = {"method_args": TRAK_ARGS, "shard_size": 40, "dtype": "float32", "recall_queries": 50}
SCRIPT = """
import os, sys, time
import torch
torch.set_num_threads(1)
from indexer.build import build_index

def progress(stage, done, total):
    if stage == os.environ["STOP_STAGE"] and done >= int(os.environ["STOP_AT"]):
        open(os.environ["SIGNAL"], "w").close()
        time.sleep(600)  # killed here, in the middle of the build

build_index(sys.argv[1], sys.argv[2], name="digits", root=sys.argv[3], progress=progress,
            show_progress=False, method_args={"proj_dim": 64}, shard_size=40, dtype="float32",
            recall_queries=50)
"""


@pytest.fixture(scope="module")
def uninterrupted(setup: Setup, tmp_path_factory) -> AttributionIndex:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = build_index(setup.card, setup.corpus, name="digits", root=root, show_progress=False, **OPTIONS)
    return AttributionIndex.open(result.path)


def _kill_build(setup: Setup, root: Path, stage: str, at: int, tmp_path: Path) -> None:
    signal_file = tmp_path / "reached"
    env = {**os.environ, "STOP_STAGE": stage, "STOP_AT": str(at), "SIGNAL": str(signal_file),
           "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(setup.card), str(setup.corpus), str(root)],
                               env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not signal_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"the build exited early: {process.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "the build never reached the kill point"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("stage", "at"), [("featurize", 80), ("transform", 120)])
def test_kill_9_mid_build_then_resume(setup: Setup, fresh_root: Path, tmp_path: Path,
                                      uninterrupted: AttributionIndex, stage: str, at: int) -> None:
    before = AttributionIndex.open("digits", root=fresh_root)
    queries = before.query_vectors(setup.test)
    expected = before.topk(queries, k=5)

    _kill_build(setup, fresh_root, stage, at, tmp_path)

    # the published version is untouched and still answers
    served = AttributionIndex.open("digits", root=fresh_root)
    assert served.version == "v0001"
    again = served.topk(queries, k=5)
    assert again.ids == expected.ids and np.array_equal(again.scores, expected.scores)
    staged = list((fresh_root / "digits" / "staging").glob("*/raw/*.npy"))
    assert len(staged) >= 2

    # the rerun resumes from the finished shards and equals an uninterrupted build
    result = build_index(setup.card, setup.corpus, name="digits", root=fresh_root, show_progress=False, **OPTIONS)
    assert result.version == "v0002" and result.resumed_shards >= 2
    resumed = AttributionIndex.open("digits", root=fresh_root)
    assert resumed.version == "v0002"
    assert result.manifest["shards"] == uninterrupted.manifest["shards"]  # same sha256 per shard
    for name in ("index.faiss", "ids.parquet", "state.safetensors", "records.sqlite", "self_influence/00003.npy"):
        assert result.manifest["files"][name]["sha256"] == uninterrupted.manifest["files"][name]["sha256"], name
    reference = uninterrupted.topk(queries, k=5)
    got = resumed.topk(queries, k=5)
    assert got.ids == reference.ids and np.array_equal(got.scores, reference.scores)
    assert not (fresh_root / "digits" / "staging").exists()
