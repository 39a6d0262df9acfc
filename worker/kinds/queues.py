"""Which queue a job goes to: gradient work on ``gpu``, work on stored vectors on ``cpu``."""

from __future__ import annotations

from typing import Any


def queue_for(kind: str, params: dict[str, Any]) -> str:
    """``cpu`` for valuation/mislabel answered from an index's stored vectors, else ``gpu``."""
    if kind in ("valuation", "mislabel") and params.get("index"):
        return "cpu"
    return "gpu"
