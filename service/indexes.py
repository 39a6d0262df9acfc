"""Published indexes kept open in the API process, per tenant, read-only.

An index is opened once (vectors memory-mapped, FAISS loaded, the method's query side restored)
and reused, with a :class:`~service.batching.Batcher` that answers its top-k requests. Its
``current`` pointer is re-read at most once a second, so a newly published version is served
without a restart while the old object finishes the queries it has.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indexer.errors import IndexerError, IndexNotFoundError
from indexer.index import AttributionIndex
from indexer.layout import check_name, read_current
from service.batching import Batcher
from worker.config import WorkerSettings

log = logging.getLogger(__name__)
RECHECK_SECONDS = 1.0


class IndexCache:
    """LRU of open indexes keyed by (tenant, name); thread-safe."""

    def __init__(self, settings: WorkerSettings, size: int | None = None,
                 featurizer: Callable[[AttributionIndex], Callable[..., Any] | None] | None = None):
        self.settings = settings
        self.featurizer = featurizer  # index -> remote query featurization, or None (local)
        self.size = size or getattr(settings, "index_cache_size", 16)
        self._open: OrderedDict[tuple[str, str], tuple[Batcher, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self.preload_done = threading.Event()
        self.preload_errors: dict[str, str] = {}

    def directory(self, tenant: str, name: str) -> Path:
        return self.settings.index_root(tenant) / check_name(name)

    def get(self, tenant: str, name: str) -> AttributionIndex:
        """The current version of ``name`` for ``tenant``; raises IndexNotFoundError."""
        return self.batcher(tenant, name).index

    def batcher(self, tenant: str, name: str) -> Batcher:
        """The batcher serving the current version of ``name`` (it holds the open index)."""
        try:
            directory = self.directory(tenant, name)
        except IndexerError:
            raise IndexNotFoundError(f"index {name!r} not found") from None
        key = (tenant, name)
        now = time.monotonic()
        with self._lock:
            entry = self._open.get(key)
            if entry is not None and now - entry[1] < RECHECK_SECONDS:
                self._open.move_to_end(key)
                return entry[0]
        with self._opening:  # one open at a time: concurrent first requests share it
            return self._refresh(key, directory, now)

    def _refresh(self, key: tuple[str, str], directory: Path, now: float) -> Batcher:
        with self._lock:
            entry = self._open.get(key)
        if entry is not None and now - entry[1] < RECHECK_SECONDS:
            return entry[0]
        current = read_current(directory) if directory.is_dir() else None
        if current is None:
            self.evict(*key)
            raise IndexNotFoundError(
                f"index {key[1]!r} not found; list your indexes with GET /v1/indexes or build "
                "one with a build_index job")
        if entry is not None and entry[0].index.version == current:
            with self._lock:
                self._open[key] = (entry[0], now)
            return entry[0]
        index = AttributionIndex.open(directory)
        batcher = Batcher(index, self.featurizer(index) if self.featurizer else None,
                          max_rows=getattr(self.settings, "topk_batch_rows", 64),
                          wait_seconds=getattr(self.settings, "topk_batch_wait_ms", 4.0) / 1000)
        with self._lock:
            previous = self._open.pop(key, None)
            self._open[key] = (batcher, now)
            while len(self._open) > self.size:
                self._open.popitem(last=False)[1][0].close()
        if previous is not None:
            previous[0].close()  # its thread finishes what it holds, then stops
        return batcher

    def evict(self, tenant: str, name: str) -> None:
        with self._lock:
            entry = self._open.pop((tenant, name), None)
        if entry is not None:
            entry[0].close()

    def names(self, tenant: str) -> list[str]:
        """The tenant's indexes that have a published version."""
        root = self.settings.index_root(tenant)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "current").is_file())

    def loaded(self) -> int:
        with self._lock:
            return len(self._open)

    def preload(self) -> None:
        """Open every tenant's indexes, restore their query side and open their verbatim-span
        index if they have one (for /readyz).

        What is alive then (modules, models, indexes) lives as long as the process: it is
        frozen out of the garbage collector, whose full passes would otherwise rescan it under
        the GIL (190 ms for the 330k objects of a process serving one 100k index)."""
        tenants = self.settings.data_dir / "tenants"
        try:
            for tenant_dir in sorted(tenants.iterdir()) if tenants.is_dir() else []:
                for name in self.names(tenant_dir.name)[: self.size]:
                    try:
                        batcher = self.batcher(tenant_dir.name, name)
                        if not batcher.remote:
                            batcher.index.method()
                        if batcher.index.manifest.get("verbatim"):  # provenance spans, always local
                            batcher.index.verbatim()
                    except Exception as err:  # a broken index must not stop the others
                        self.preload_errors[f"{tenant_dir.name}/{name}"] = str(err)
                        log.warning("could not preload index %s/%s: %s", tenant_dir.name, name, err)
        finally:
            gc.freeze()
            self.preload_done.set()

    def close(self) -> None:
        with self._lock:
            for batcher, _ in self._open.values():
                batcher.close()
                batcher.index.close()
            self._open.clear()
