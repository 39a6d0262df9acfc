"""A featurization probe: a few records and their query vectors, stored with every version.

Query vectors are computed by the engine at query time, train vectors were computed at build
time. If the engine's featurization changed in between (another attribution version, another
projection, other weights), the two sides no longer live in the same space and every score is
silently wrong. Re-featurizing the probe when an index is first queried catches that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import IndexMismatchError

PROBE = "probe.npz"
PROBE_RECORDS = 4


def make_probe(engine: Any, examples: Any) -> dict[str, np.ndarray]:
    """Inputs, targets and query vectors (output measurement) of a few ``examples``."""
    queries = engine.query_vectors(examples, "output").astype(np.float32)
    return {"x": examples.x.numpy(), "y": examples.y.numpy(), "queries": queries}


def probe_fingerprint(probe: dict[str, np.ndarray]) -> str:
    """sha256 of the probe's query vectors at 3 significant digits: identifies how the engine
    featurizes (code, projection, weights), robust to last-bit float noise."""
    import hashlib

    q = probe["queries"]
    peak = float(np.abs(q).max()) or 1.0
    return hashlib.sha256(np.round(q / peak, 3).astype(np.float32).tobytes()).hexdigest()


def write_probe(path: Path, probe: dict[str, np.ndarray]) -> None:
    """Store a probe made by :func:`make_probe`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **probe)
    tmp.replace(path)


def check_probe(path: Path, method: Any, where: str) -> None:
    """Raise :class:`IndexMismatchError` when ``method`` no longer featurizes the probe the same."""
    if not path.is_file():  # versions written before probes existed
        return
    import torch

    with np.load(path, allow_pickle=False) as data:
        x, y, stored = data["x"], data["y"], data["queries"]
    now = method.query_vectors((torch.from_numpy(x), torch.from_numpy(y)), "output")
    scale = float(np.abs(stored).max()) or 1.0
    if now.shape == stored.shape and np.allclose(now, stored, rtol=1e-3, atol=1e-3 * scale):
        return
    agreement = (float(np.corrcoef(now.ravel(), stored.ravel())[0, 1])
                 if now.shape == stored.shape else float("nan"))
    raise IndexMismatchError(
        f"{where}: the engine featurizes queries differently from when the index was built "
        f"(probe vectors correlate {agreement:.3f}); the attribution code, its projection or "
        "the model weights changed. Rebuild the index with this version"
    )
