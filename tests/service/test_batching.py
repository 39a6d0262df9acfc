"""The top-k batcher in-process, on the service tests' TRAK index (two checkpoints): concurrent
requests share batches and get the answers they get alone; concurrent featurization through
one open index (the batcher's thread and a route's) gives the sequential vectors."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import REGISTRY
from service_helpers import TENANT, World

from indexer.index import AttributionIndex
from service.batching import Batcher
from worker.kinds.common import examples_for_index


def _open(world: World) -> tuple[AttributionIndex, list]:
    index = AttributionIndex.open(world.harness.settings.index_root(TENANT) / "digits")
    x, y = world.data.test_x.astype(np.float64), world.data.test_y.astype(np.float64)
    return index, [examples_for_index(index, x[i:i + 1], y[i:i + 1]) for i in range(len(x))]


def test_concurrent_requests_share_batches_and_answers(world: World) -> None:
    index, examples = _open(world)
    batcher = Batcher(index, wait_seconds=0.05)
    try:
        async def alone() -> list:
            return [await batcher.ask(e, 5, True, "output") for e in examples]

        async def together() -> list:
            return await asyncio.gather(*(batcher.ask(e, 5, True, "output") for e in examples))

        expected = asyncio.run(alone())
        before = REGISTRY.get_sample_value("tda_topk_batch_rows_count") or 0.0
        found = asyncio.run(together())
        batches = (REGISTRY.get_sample_value("tda_topk_batch_rows_count") or 0.0) - before
    finally:
        batcher.close()
        index.close()
    assert batches < len(examples) / 2  # most requests were answered together
    for got, want in zip(found, expected, strict=True):
        (pro, opp), = got
        (want_pro, want_opp), = want
        assert [h["id"] for h in pro] == [h["id"] for h in want_pro]
        np.testing.assert_allclose([h["score"] for h in pro], [h["score"] for h in want_pro],
                                   rtol=1e-5, atol=1e-6)
        assert [h["id"] for h in opp] == [h["id"] for h in want_opp]
        assert pro[0]["metadata"] == want_pro[0]["metadata"] != {}


def test_featurizing_from_several_threads_is_safe(world: World) -> None:
    index, examples = _open(world)
    batcher = Batcher(index)
    try:
        sequential = [batcher.featurize(e, "loss") for e in examples]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                concurrent = list(pool.map(lambda e: batcher.featurize(e, "loss"), examples))
                for a, b in zip(concurrent, sequential, strict=True):
                    np.testing.assert_array_equal(a, b)
    finally:
        batcher.close()
        index.close()
