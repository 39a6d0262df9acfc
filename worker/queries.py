"""Query featurization on a worker, for models too large for the API process.

The API puts the examples (``.npz`` bytes) under ``{reply}:in`` in Redis, sends
``tda.query_vectors`` to the ``gpu`` queue, and blocks on the list ``{reply}``; the worker pushes
the query vectors (``.npy`` bytes) or an error, prefixed by one status byte. Payloads are a few
KB to MB and expire after the request's timeout.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import redis

OK, ERROR = b"+", b"-"
_open: OrderedDict[tuple[str, str], Any] = OrderedDict()


def pack_examples(x: np.ndarray, y: np.ndarray | None) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **({"x": x} if y is None else {"x": x, "y": y}))
    return buffer.getvalue()


def unpack_examples(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return arrays["x"], (arrays["y"] if "y" in arrays.files else None)


def pack_vectors(vectors: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32))
    return OK + buffer.getvalue()


def unpack_reply(data: bytes) -> np.ndarray:
    """The vectors, or :class:`~indexer.errors.IndexerError` with the worker's message."""
    from indexer.errors import IndexerError

    if data[:1] == OK:
        return np.load(io.BytesIO(data[1:]), allow_pickle=False)
    raise IndexerError(data[1:].decode(errors="replace"))


def answer(client: redis.Redis, index_dir: Path, version: str, measurement: str, reply: str,
           ttl: int) -> None:
    """Compute the query vectors of the examples under ``{reply}:in``; push them to ``reply``."""
    from indexer.index import AttributionIndex
    from worker.kinds.common import examples_for_index

    try:
        data = client.get(f"{reply}:in")
        if data is None:
            raise TimeoutError("the request's examples expired before a worker took it")
        key = (str(index_dir), version)
        if key not in _open:
            _open[key] = AttributionIndex.open(index_dir, version=version)
            while len(_open) > 4:
                _open.popitem(last=False)[1].close()
        index = _open[key]
        vectors = index.query_vectors(examples_for_index(index, *unpack_examples(data)),
                                      measurement)
        message = pack_vectors(vectors)
    except Exception as err:  # the API turns it into a 4xx (input) or reports it
        message = ERROR + f"{type(err).__name__}: {err}".encode()
    client.rpush(reply, message)
    client.expire(reply, ttl)
    client.delete(f"{reply}:in")
