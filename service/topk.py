"""Answer a top-k request from an open index: featurize the queries, search, attach metadata."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from service.batching import Batcher
from service.core.problems import Problem
from service.schemas.indexes import (
    Neighbor,
    TopKExamples,
    TopKRequest,
    TopKResponse,
    TopKResult,
)
from service.texts import encoder_for
from worker.kinds.common import examples_for_index


def examples_arrays(x: list[list[float]], y: list | None, what: str = "examples"
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rectangular, finite arrays from the wire format (422 naming the problem otherwise)."""
    widths = {len(row) for row in x}
    if len(widths) != 1:
        raise Problem(422, "invalid-examples", f"{what}.x rows have different lengths "
                      f"{sorted(widths)[:5]}; every row must have the same number of values")
    inputs = np.asarray(x, dtype=np.float64)
    if not np.isfinite(inputs).all():
        raise Problem(422, "invalid-examples", f"{what}.x contains NaN or infinite values")
    if y is None:
        return inputs, None
    if len(y) != len(x):
        raise Problem(422, "invalid-examples", f"{what} has {len(x)} inputs but {len(y)} labels; "
                      "give one label per input row")
    try:
        targets = np.asarray(y, dtype=np.float64)
    except ValueError:
        raise Problem(422, "invalid-examples", f"{what}.y must be numbers (or equal-length lists "
                      "of numbers)") from None
    if not np.isfinite(targets).all():
        raise Problem(422, "invalid-examples", f"{what}.y contains NaN or infinite values")
    return inputs, targets


async def request_arrays(index: Any, examples: TopKExamples) -> tuple[np.ndarray,
                                                                       np.ndarray | None]:
    """Input rows and labels of a request: as sent, or tokenised from its texts."""
    if examples.x is not None:
        return examples_arrays(examples.x, examples.y)
    assert examples.text is not None
    encoder = encoder_for(index)
    encoder.check()  # before reading labels: a features index says so first
    labels = None
    if examples.y is not None:
        if len(examples.y) != len(examples.text):
            raise Problem(422, "invalid-examples", f"examples has {len(examples.text)} texts but "
                          f"{len(examples.y)} labels; give one label per text")
        _, labels = examples_arrays([[0.0]] * len(examples.text), examples.y)
    # the first call loads the tokenizer from disk: off the event loop
    return await asyncio.to_thread(encoder.encode, examples.text, labels)


async def answer(batcher: Batcher, request: TopKRequest, max_k: int, max_examples: int,
                 timeout: float = 60.0) -> TopKResponse:
    """Top-k proponents (and opponents) of each example, with record metadata."""
    index = batcher.index
    if request.k > max_k:
        raise Problem(422, "invalid-request", f"k={request.k} exceeds the limit of {max_k}")
    if len(request.examples) > max_examples:
        raise Problem(422, "invalid-request", f"{len(request.examples)} examples exceed the "
                      f"limit of {max_examples} per request; split the batch")
    x, y = await request_arrays(index, request.examples)
    examples = examples_for_index(index, x, y)
    found = await batcher.ask(examples, request.k, request.opponents, request.measurement,
                        request.metadata, timeout)

    def neighbors(hits: list[dict]) -> list[Neighbor]:
        return [Neighbor(**h) for h in hits]

    results = [TopKResult(proponents=neighbors(pro),
                          opponents=neighbors(opp) if opp is not None else None)
               for pro, opp in found]
    return TopKResponse(index=index.name, version=index.version,
                        method=index.manifest["method"]["name"], k=request.k, results=results)
