"""Build engine methods by name and describe them for manifests."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from indexer.errors import IndexerError
from indexer.paths import confine, sha256_file

try:  # every method the engine registers (``airrep`` included once it exists)
    from attribution.methods import METHODS as METHOD_NAMES
except ImportError:  # pragma: no cover - an older engine
    METHOD_NAMES = ("trak", "tracin", "graddot", "gradcos", "influence")


def make_method(name: str, task: Any, arguments: dict[str, Any] | None = None,
                device: str | None = None, data_root: Path | None = None) -> Any:
    """``attribution.methods.build_method(name, task, **arguments)`` with indexer errors.

    ``airrep`` takes a trained encoder as ``arguments["encoder"]``: a ``.safetensors`` path
    (with its JSON manifest beside it), relative to and confined to ``data_root`` when given;
    its path and sha256 are kept on the method for the index manifest (:func:`describe_method`).
    Raises :class:`IndexerError` for an unknown name, a bad argument, or a method whose train
    side cannot be stored (queries that need the whole train set, e.g. influence with CG/LiSSA).
    """
    from attribution.errors import AttributionError
    from attribution.methods import build_method

    drop = ("method", "lambdas", "dampings", "encoder_sha256")
    arguments = {k: v for k, v in (arguments or {}).items() if k not in drop}
    source = None
    if "encoder" in arguments:
        if name != "airrep":
            raise IndexerError(f"method {name!r} takes no encoder; only 'airrep' does")
        path = resolve_encoder(arguments["encoder"], data_root)
        source = {"path": str(path), "sha256": sha256_file(path)}
        arguments["encoder"] = path
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
    if source is not None:
        method.encoder_source = source
    return method


def resolve_encoder(path: Any, data_root: Path | None) -> Path:
    """An AirRep encoder path: confined to ``data_root``, a ``.safetensors`` file that exists."""
    if not isinstance(path, str | Path):
        raise IndexerError(f"encoder must be the path of a .safetensors file, not {path!r}")
    resolved = confine(path, data_root, base=data_root, what="airrep encoder")
    if resolved.suffix != ".safetensors":
        raise IndexerError(f"airrep encoder {path} is not a .safetensors file")
    if not resolved.is_file():
        raise IndexerError(f"airrep encoder {path} does not exist ({resolved})")
    return resolved


def check_index_dim(method: Any, directory: Path) -> None:
    """Raise when an AirRep encoder's dimension differs from the current version of the index
    at ``directory`` (a new version must keep the vectors' dimension; use a new index name)."""
    from indexer.layout import read_current, read_manifest

    encoder = getattr(method, "encoder", None)
    if getattr(method, "name", None) != "airrep" or encoder is None:
        return
    current = read_current(directory) if directory.is_dir() else None
    if current is None:
        return
    dim = read_manifest(directory / "versions" / current).get("dim")
    if dim is not None and int(dim) != encoder.dim:
        raise IndexerError(
            f"the airrep encoder's dimension is {encoder.dim} but index {directory.name} "
            f"({current}) stores {dim}-dimensional vectors; use an encoder of dimension {dim} "
            "or build under a new index name"
        )


def describe_method(method: Any) -> dict[str, Any]:
    """Projection kind/dim/seed and λ (regularisation or damping) of a fitted method."""
    args = method.arguments()
    projection: dict[str, Any] = {"kind": args.get("projection"), "dim": args.get("proj_dim"),
                                  "seed": args.get("seed")}
    if hasattr(method, "describe_projection"):
        with contextlib.suppress(Exception):  # a description must never fail a build
            projection.update(method.describe_projection())
    lam = args.get("lambdas") or args.get("dampings") or args.get("lambda_reg") or args.get("damping")
    described: dict[str, Any] = {"projection": projection, "lambda": lam}
    if getattr(method, "name", None) == "airrep":
        described["encoder"] = dict(getattr(method, "encoder_source", None) or {"path": None})
        encoder = getattr(method, "encoder", None)
        if encoder is not None:
            described["encoder"].update(encoder.config())
    return described
