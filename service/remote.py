"""Top-k queries whose featurization runs on a gpu worker (models too large for the API).

Which indexes: those whose model has more than ``TDA_API_QUERY_MAX_PARAMETERS`` parameters,
estimated from the size of its weight files (4 bytes per parameter).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis

from worker.config import WorkerSettings
from worker.queries import pack_examples, unpack_reply


def model_parameters(manifest: dict[str, Any]) -> int:
    """Rough parameter count of an index's model: its first weights file's bytes / 4."""
    model = manifest["model"]
    paths = [Path(c["path"]) for c in model.get("checkpoints", [])[:1]]
    directory = model.get("card", {}).get("architecture", {}).get("huggingface")
    if directory:
        paths += [Path(directory) / f for f in model.get("huggingface_files", {})
                  if f.endswith(".safetensors")]
    return sum(p.stat().st_size for p in paths if p.is_file()) // 4


class RemoteQueries:
    """``(examples, measurement) -> query vectors``, computed by a worker over Redis."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis, index: Any, timeout: float):
        self.settings, self.client, self.timeout = settings, client, timeout
        self.index_dir, self.version = index.path.parent.parent, index.version

    def __call__(self, examples: Any, measurement: str = "output") -> np.ndarray:
        from worker.tasks import QUERY_VECTORS, app

        ttl = int(self.timeout) + 5
        reply = f"{self.settings.key_prefix}query:{uuid.uuid4().hex}"
        self.client.set(f"{reply}:in", pack_examples(examples.x.numpy(), examples.y.numpy()),
                        ex=ttl)
        app.send_task(QUERY_VECTORS, args=[str(self.index_dir), self.version, measurement,
                                           reply, ttl], queue=self.settings.queues["gpu"])
        got = self.client.blpop([reply], timeout=self.timeout)
        if got is None:
            self.client.delete(f"{reply}:in")
            raise TimeoutError(f"no gpu worker answered the query within {self.timeout:.0f} s")
        self.client.delete(reply)
        return unpack_reply(got[1])
