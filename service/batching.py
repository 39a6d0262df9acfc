"""Dynamic batching of top-k requests: concurrent requests on one index share one query
featurization and one search.

Requests wait in a queue; one thread per open index takes everything waiting (up to
``max_rows`` examples), computes all query vectors in one engine call, searches once with the
largest k, and hands each request its rows. Alone, a request goes straight through; under load
the batches grow by themselves, so throughput rises instead of latency.

Under steady concurrency the answers of one batch go out together and the next requests come
back together, a little spread out; taking the first one alone would split them into a batch
of one and a batch of the rest, each paying a full search (an exact search over 100k vectors
costs about as much for 1 query as for 16). So when the last batch was larger than what is
waiting, the thread waits a few ms (``wait_seconds`` per request, 4 × in all) for as many rows
as it had. Alone (the last batch held one request), nothing ever waits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.core.metrics import TOPK_BATCH_ROWS

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
                 max_rows: int = 64, idle_seconds: float = 1.0, wait_seconds: float = 0.004):
        self.index, self.max_rows, self.idle = index, max_rows, idle_seconds
        self.wait = wait_seconds
        self._last_rows = 1  # rows of the previous batch: what steady load brings back
        #: the query side: the index's own method, or a worker (service.remote) for big models
        #: (concurrent local calls are safe: the engine serialises its checkpoint swaps)
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
            batch = self._collect(first)
            self._last_rows = sum(len(item.examples) for item in batch)
            TOPK_BATCH_ROWS.observe(self._last_rows)
            # requests answered together share the measurement and the input shape (token
            # sequences of another length would not stack)
            groups: dict[tuple, list[_Ask]] = {}
            for item in batch:
                key = (item.measurement, tuple(item.examples.x.shape[1:]))
                groups.setdefault(key, []).append(item)
            for group in groups.values():
                self._answer(group)

    def _collect(self, first: _Ask) -> list[_Ask]:
        """``first`` and what else is waiting, up to ``max_rows``. While it has fewer rows than
        the previous batch, it waits for each next request up to ``wait`` (4 × ``wait`` in
        all): a gap longer than that means the rest is not coming soon."""
        batch, rows = [first], len(first.examples)
        target = min(self.max_rows, self._last_rows)
        deadline = time.monotonic() + 4 * self.wait
        while rows < self.max_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                left = min(self.wait, deadline - time.monotonic())
                if rows >= target or left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            batch.append(item)
            rows += len(item.examples)
        return batch

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
