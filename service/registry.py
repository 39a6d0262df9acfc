"""Per-tenant registries of models and corpora: small JSON records next to the tenant's data.

A registration names a file under the tenant's file area (``{data}/tenants/{t}/files``), checks
it, and records its fingerprint. Records live in ``{data}/tenants/{t}/registry/<kind>/<name>.json``
and are written atomically, so a failed or concurrent request never leaves half a record.
Deleting a registration leaves the files in place.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.corpus import FORMATS
from indexer.errors import IndexerError
from indexer.paths import atomic_write_text, confine, sha256_file

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1–128 letters, digits, '.', '_' or '-', starting with a letter or digit"


class PathOutsideRoot(IndexerError):
    """A client-given path that resolves outside the tenant's file area."""


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise IndexerError(f"{what} name {name!r} is not valid: use {NAME_RULE}")
    return name


class Registry:
    """One tenant's records of one kind (``models`` or ``corpora``)."""

    def __init__(self, tenant_dir: Path, kind: str):
        self.directory = tenant_dir / "registry" / kind
        self.files_root = tenant_dir / "files"
        self.kind = kind

    def _path(self, name: str) -> Path:
        return self.directory / f"{check_name(name, self.kind[:-1])}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(name).read_text(encoding="utf-8"))
        except (FileNotFoundError, IndexerError):
            return None

    def list(self) -> list[dict[str, Any]]:
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # a record being replaced right now; the next listing shows it
        return records

    def put(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {"name": name, "registered_at": time.time(), **record}
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(name), json.dumps(record, indent=1))
        return record

    def delete(self, name: str) -> bool:
        try:
            self._path(name).unlink()
            return True
        except FileNotFoundError:
            return False

    def resolve(self, path: str, what: str) -> Path:
        """A client-given path, relative to (and confined to) the tenant's file area."""
        return resolve_in(self.files_root, path, what)


def resolve_in(files_root: Path, path: str, what: str) -> Path:
    """``path`` relative to ``files_root``; :class:`PathOutsideRoot` if it escapes it."""
    try:
        return confine(path, files_root, base=files_root, what=what)
    except IndexerError:
        raise PathOutsideRoot(
            f"{what} {path!r} is outside your file area (the data root); give a path relative "
            "to it, as listed by GET /v1/files, and upload files with PUT /v1/files/<path>"
        ) from None


def relative(path: str | Path, files_root: Path) -> str:
    """How a client sees a server path: relative to its file area."""
    try:
        return str(Path(path).relative_to(files_root.resolve()))
    except ValueError:
        return Path(path).name


def describe_model(path: Path, files_root: Path) -> dict[str, Any]:
    """Validate a model card (every problem by field) and summarise it for the registry."""
    from indexer.cards import load_card, model_fingerprint

    try:
        card = load_card(path, data_root=files_root)
    except UnicodeDecodeError:
        raise IndexerError(f"{path.name} is not a model card: cards are YAML or JSON text") from None
    return {
        "path": str(path),
        "task": card.task,
        "architecture": card.architecture.model_dump(exclude_none=True),
        "checkpoints": len(card.checkpoints),
        "input_shape": card.input_shape,
        "fingerprint": model_fingerprint(card)["sha256"],
    }


def describe_corpus(path: Path) -> dict[str, Any]:
    """Check a corpus file's format and ids cheaply; full checks run with its model's task."""
    if not path.is_file():
        raise IndexerError(f"corpus file {path.name} not found; upload it with PUT /v1/files/...")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise IndexerError(f"corpus {path.name}: unknown format {path.suffix!r}; use "
                           ".parquet, .jsonl or .npz")
    columns, rows = _peek(path, fmt)
    if "id" not in columns:
        raise IndexerError(f"corpus {path.name} has no 'id' column; every record needs a stable id")
    return {"path": str(path), "format": fmt, "records": rows, "columns": columns,
            "input_size": _input_size(path, fmt, columns),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _input_size(path: Path, fmt: str, columns: list[str]) -> int | None:
    """Values per input row (to refuse wrongly shaped examples at submission), if cheap."""
    numbered = [c for c in columns if re.fullmatch(r"x_?\d+", c)]
    if numbered:
        return len(numbered)
    try:
        if fmt == "parquet" and "features" in columns:
            import pyarrow.parquet as pq

            first = pq.ParquetFile(path).read_row_group(0, columns=["features"]).column(0)[0]
            return int(np.asarray(first.as_py(), dtype=float).size)
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as archive:
                name = "x" if "x" in archive.files else "features"
                if name in archive.files:
                    return int(np.prod(archive[name].shape[1:]))
    except (OSError, ValueError, IndexError):
        return None
    return None


def _peek(path: Path, fmt: str) -> tuple[list[str], int]:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            return meta.schema_arrow.names, meta.metadata.num_rows
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                rows = int(archive["id"].shape[0]) if "id" in names else 0
            return names, rows
        rows, columns = 0, None
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                if columns is None:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("each line must be a JSON object")
                    columns = list(record)
                rows += 1
        return columns or [], rows
    except (OSError, ValueError) as err:
        raise IndexerError(f"corpus {path.name} is not a readable {fmt} file: {err}") from err
