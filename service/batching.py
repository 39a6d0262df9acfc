"""Dynamic batching of top-k requests: concurrent requests on one index share one query
featurization and one search.

Requests wait in a queue; one thread per open index takes everything waiting (up to
``max_rows`` examples), computes all query vectors in one engine call, searches once with the
largest k, and hands each request its rows. Alone, a request goes straight through; under load
the batches grow by themselves, so throughput rises instead of latency.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
Hits = list[dict[str, Any]]


@dataclass
class _Ask:
    examples: Any  # engine Examples, already shaped for the index
    k: int
    opponents: bool
    measurement: str
    metadata: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    result: list[tuple[Hits, Hits | None]] = field(default_factory=list)

    def settle(self, error: BaseException | None = None) -> None:
        """Hand the answer (or the error) back to the request's event loop."""
        def resolve() -> None:
            if self.future.done():  # the request timed out meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(self.result)

        self.loop.call_soon_threadsafe(resolve)


class Batcher:
    """Answers top-k requests on one open index, batching those that arrive together."""

    def __init__(self, index: Any, featurize: Callable[..., Any] | None = None,
                 max_rows: int = 64, idle_seconds: float = 1.0):
        self.index, self.max_rows, self.idle = index, max_rows, idle_seconds
        #: the query side: the index's own method, or a worker (service.remote) for big models
        self.featurize = featurize or index.query_vectors
        self.remote = featurize is not None
        self._queue: queue.SimpleQueue[_Ask] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"topk-{index.name}@{index.version}")
        self._thread.start()

    async def ask(self, examples: Any, k: int, opponents: bool, measurement: str,
                  metadata: bool = True, timeout: float = 60.0) -> list[tuple[Hits, Hits | None]]:
        """Per example: (proponent hits, opponent hits or None); each hit has id, score, rank
        and (if asked) the record's ``metadata``.

        Awaited on the event loop: no request thread blocks while the batch is computed (on a
        small machine, dozens of threads contending for the GIL cost more than the search)."""
        loop = asyncio.get_running_loop()
        item = _Ask(examples, k, opponents, measurement, metadata, loop, loop.create_future())
        self._queue.put(item)
        try:
            return await asyncio.wait_for(item.future, timeout)
        except TimeoutError:
            raise TimeoutError(f"top-k on {self.index.name} took longer than {timeout} s") from None

    def close(self) -> None:
        self._closed.set()

    # --- the batching thread --------------------------------------------------------------
    def _loop(self) -> None:
        while not (self._closed.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=self.idle)
            except queue.Empty:
                continue
            batch, rows = [first], len(first.examples)
            while rows < self.max_rows:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                rows += len(item.examples)
            for measurement in {item.measurement for item in batch}:
                self._answer([i for i in batch if i.measurement == measurement])

    def _answer(self, group: list[_Ask]) -> None:
        try:
            self._answer_together(group)
        except Exception as err:  # one bad request must not fail the others: retry alone
            if len(group) == 1:
                group[0].settle(err)
            else:
                for item in group:
                    self._answer([item])

    def _answer_together(self, group: list[_Ask]) -> None:
        import torch

        from attribution.data import Examples

        examples = (group[0].examples if len(group) == 1 else
                    Examples(torch.cat([i.examples.x for i in group]),
                             torch.cat([i.examples.y for i in group])))
        queries = self.featurize(examples, group[0].measurement)
        k = max(i.k for i in group)
        proponents = self.index.topk(queries, k)
        opponents = (self.index.topk(queries, k, opponents=True)
                     if any(i.opponents for i in group) else None)
        start = 0
        for item in group:
            rows = range(start, start + len(item.examples))
            item.result = [(proponents.hits(j)[: item.k],
                            opponents.hits(j)[: item.k] if item.opponents and opponents else None)
                           for j in rows]
            start += len(item.examples)
        self._attach_metadata([i for i in group if i.metadata])
        for item in group:
            item.settle()

    def _attach_metadata(self, items: list[_Ask]) -> None:
        """One lookup for the whole batch, from this thread (the index serialises lookups)."""
        hits = [h for i in items for pair in i.result for side in pair for h in side or []]
        if not hits:
            return
        found = {r["id"]: r for r in self.index.records(sorted({h["id"] for h in hits}))}
        for h in hits:
            h["metadata"] = {k: v for k, v in found.get(h["id"], {}).items() if k != "id"}
