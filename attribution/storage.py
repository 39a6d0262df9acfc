"""How train-side vectors are kept at rest: float32, or float16 scaled by a power of two.

TRAK and influence train vectors are tiny (|x| ~ 1e-7 with a large λ), far into float16's
subnormal range, where casting them unscaled keeps almost none of their precision. Multiplying
by 2^e first maps the largest |value| into [16, 32): float16 then keeps ~11 significant bits for
values down to 4e-6 of the peak, and the scaling itself is exact in float32.
"""

from __future__ import annotations

import numpy as np

from attribution.errors import AttributionError

STORAGE_DTYPES = ("float32", "float16")


def power_of_two_scale(vectors: np.ndarray) -> float:
    """A power of two that maps the largest |value| of ``vectors`` into [16, 32) (1 when all 0)."""
    peak = float(np.max(np.abs(vectors))) if vectors.size else 0.0
    if not np.isfinite(peak) or peak == 0.0:
        return 1.0
    return float(2.0 ** (4 - np.floor(np.log2(peak))))


def encode(vectors: np.ndarray, dtype: str, scale: float | None = None) -> tuple[np.ndarray, float]:
    """``(vectors × scale in dtype, scale)``; float32 is stored as is (scale 1).

    ``scale`` defaults to :func:`power_of_two_scale` of ``vectors`` for float16. Raises
    :class:`AttributionError` when a value overflows float16 at that scale.
    """
    if dtype not in STORAGE_DTYPES:
        raise AttributionError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if dtype == "float32":
        return vectors, 1.0
    scale = power_of_two_scale(vectors) if scale is None else float(scale)
    stored = (vectors * np.float32(scale)).astype(np.float16)
    if not np.isfinite(stored).all():
        raise AttributionError(
            f"vectors exceed the float16 range at scale {scale:g}; store them as float32"
        )
    return stored, scale


def decode(stored: np.ndarray, scale: float) -> np.ndarray:
    """The float32 values that :func:`encode` stored."""
    values = np.asarray(stored, dtype=np.float32)
    return values if scale == 1.0 else values * np.float32(1.0 / scale)
