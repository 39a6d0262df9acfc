"""Build engine methods by name and describe them for manifests."""

from __future__ import annotations

import contextlib
from typing import Any

from indexer.errors import IndexerError

try:  # every method the engine registers (``airrep`` included once it exists)
    from attribution.methods import METHODS as METHOD_NAMES
except ImportError:  # pragma: no cover - an older engine
    METHOD_NAMES = ("trak", "tracin", "graddot", "gradcos", "influence")


def make_method(name: str, task: Any, arguments: dict[str, Any] | None = None,
                device: str | None = None) -> Any:
    """``attribution.methods.build_method(name, task, **arguments)`` with indexer errors.

    Raises :class:`IndexerError` for an unknown name, a bad argument, or a method whose train
    side cannot be stored (queries that need the whole train set, e.g. influence with CG/LiSSA).
    """
    from attribution.errors import AttributionError
    from attribution.methods import build_method

    arguments = {k: v for k, v in (arguments or {}).items() if k not in ("method", "lambdas", "dampings")}
    try:
        method = build_method(name, task, device=device, **arguments)
    except AttributionError as err:
        raise IndexerError(f"method {name!r}: {err}") from err
    except TypeError as err:
        raise IndexerError(f"method {name!r} got an unknown argument: {err}") from err
    if not getattr(method, "indexable", True):
        raise IndexerError(
            f"method {name!r} with {arguments} cannot be indexed: its queries need the whole "
            "train set (e.g. influence solver 'cg'/'lissa'). Use solver='ekfac' or 'exact', or "
            "submit an attribution job instead"
        )
    return method


def describe_method(method: Any) -> dict[str, Any]:
    """Projection kind/dim/seed and λ (regularisation or damping) of a fitted method."""
    args = method.arguments()
    projection: dict[str, Any] = {"kind": args.get("projection"), "dim": args.get("proj_dim"),
                                  "seed": args.get("seed")}
    if hasattr(method, "describe_projection"):
        with contextlib.suppress(Exception):  # a description must never fail a build
            projection.update(method.describe_projection())
    lam = args.get("lambdas") or args.get("dampings") or args.get("lambda_reg") or args.get("damping")
    return {"projection": projection, "lambda": lam}
