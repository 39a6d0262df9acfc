"""Job kinds: one module per kind, each with ``run(ctx) -> Result``; a few lines each."""

from __future__ import annotations

from types import ModuleType

from worker.kinds import (
    attribution,
    build_index,
    evaluate,
    mislabel,
    provenance,
    subsets,
    valuation,
)

KINDS: dict[str, ModuleType] = {
    "attribution": attribution,
    "valuation": valuation,
    "mislabel": mislabel,
    "evaluate": evaluate,
    "build_index": build_index,
    "subsets": subsets,
    "provenance": provenance,
}
