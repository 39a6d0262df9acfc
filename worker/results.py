"""The result store: one directory of files per job; Redis keeps only a pointer and a summary.

A job's result is a table (``result.parquet``, what ``GET /v1/jobs/{id}/result`` pages
through), optional NumPy arrays (``<name>.npy``, e.g. the full score matrix) and
``summary.json``. It is written under a temporary name and published by an atomic rename, so a
job killed while writing leaves nothing half-written, and a redelivered job that finds its
result already published keeps the first one: the result exists once.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TABLE = "result.parquet"
SUMMARY = "summary.json"


@dataclass
class Result:
    """What a job hands back: a table of rows, named arrays and a small JSON summary."""

    table: pa.Table
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def publish(directory: Path, result: Result, token: str) -> Path:
    """Write ``result`` to ``directory`` atomically; keep an already published one."""
    if directory.exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{token}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    pq.write_table(result.table, staging / TABLE)
    for name, array in result.arrays.items():
        np.save(staging / f"{name}.npy", np.ascontiguousarray(array))
    (staging / SUMMARY).write_text(json.dumps(result.summary, indent=1, default=_jsonable))
    _fsync_dir(staging)
    try:
        os.rename(staging, directory)  # atomic; fails if another attempt published first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not directory.exists():
            raise
    _fsync_dir(directory.parent)
    return directory


def pointer(directory: Path, result: Result) -> dict[str, Any]:
    """What Redis keeps: where the files are, how many rows, and the summary."""
    return {
        "path": str(directory),
        "rows": result.table.num_rows,
        "columns": result.table.column_names,
        "arrays": {name: list(a.shape) for name, a in result.arrays.items()},
        "summary": json.loads(json.dumps(result.summary, default=_jsonable)),
    }


def read_page(directory: Path, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Rows ``offset:offset+limit`` of a published table, and the total row count."""
    table = pq.read_table(directory / TABLE, memory_map=True)
    total = table.num_rows
    page = table.slice(offset, max(0, min(limit, total - offset)))
    return page.to_pylist(), total


def array_path(directory: Path, name: str) -> Path | None:
    """Path of a published array, or None."""
    path = directory / f"{name}.npy"
    return path if path.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
