"""Training corpora: Parquet, JSONL or NumPy ``.npz`` with a stable ``id`` per record.

Column conventions (the same names in all three formats):

* ``id`` — unique, non-null string or integer (kept as a string);
* inputs — ``features`` (a list column, nested lists allowed), or numeric columns ``x0, x1, ...``,
  or ``input_ids`` (token lists, padded to equal length), or ``text`` (tokenized with the card's
  tokenizer); in ``.npz``: an array ``x`` / ``features``;
* targets — ``label`` (classification), ``target`` (regression), ``labels`` (causal LM, optional;
  defaults to the inputs, −100 = ignore);
* every other column is metadata, returned with results (source, url, license, ...).

Problems are found before any work starts and reported with the offending ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer.errors import CorpusError
from indexer.paths import confine, sha256_file

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".npz": "npz"}
IGNORE_INDEX = -100
_X_COLUMN = re.compile(r"^x_?(\d+)$")
Tokenizer = Callable[[list[str]], list[list[int]]]


@dataclass
class Corpus:
    """A checked corpus held in memory: ids, inputs, targets and metadata, in row order."""

    ids: np.ndarray  # (n,) object array of str
    x: np.ndarray  # (n, *input_shape): float32 features or int64 token ids
    y: np.ndarray  # (n,) labels / targets, or (n, L) causal-LM labels
    metadata: pa.Table  # one row per record, without id / inputs / targets
    path: Path
    format: str
    fingerprint: str
    input_kind: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def examples(self, start: int = 0, stop: int | None = None) -> Any:
        """Rows ``start:stop`` as engine :class:`attribution.data.Examples`."""
        import torch

        from attribution.data import Examples

        return Examples(torch.from_numpy(self.x[start:stop]), torch.from_numpy(self.y[start:stop]))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for manifests."""
        return {
            "path": str(self.path),
            "format": self.format,
            "sha256": self.fingerprint,
            "num_records": len(self),
            "input_kind": self.input_kind,
            "input_shape": list(self.x.shape[1:]),
            "input_dtype": str(self.x.dtype),
            "metadata_columns": self.metadata.column_names,
        }


def load_corpus(
    path: str | Path,
    task: str,
    *,
    data_root: Path | None = None,
    input_shape: list[int] | None = None,
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
    pad_id: int = 0,
) -> Corpus:
    """Read and check a corpus for a ``task`` ("classification", "regression", "causal-lm").

    Token inputs are right-padded with ``pad_id`` (the model's pad token) to equal length.

    Raises :class:`CorpusError` for an unknown format, missing or duplicate ids, missing inputs
    or targets, ragged or non-numeric inputs, NaN/inf values and non-integer class labels.
    """
    resolved = confine(path, data_root, what="corpus")
    if not resolved.is_file():
        raise CorpusError(f"corpus {path} not found (looked at {resolved})")
    fmt = FORMATS.get(resolved.suffix.lower())
    if fmt is None:
        raise CorpusError(
            f"corpus {path}: unknown format {resolved.suffix!r}; use .parquet, .jsonl or .npz"
        )
    table = {"parquet": _read_parquet, "jsonl": _read_jsonl, "npz": _read_npz}[fmt](resolved)
    if table.num_rows == 0:
        raise CorpusError(f"corpus {path} has no records")
    ids = _ids(table)
    x, kind, used, lengths = _inputs(table, ids, task, tokenizer, max_length, pad_id)
    if input_shape is not None:
        x = _reshape(x, input_shape, kind)
    y, used_y = _targets(table, ids, task, x, lengths)
    metadata = table.drop_columns([c for c in table.column_names if c in {"id", *used, *used_y}])
    return Corpus(ids, x, y, metadata, resolved, fmt, sha256_file(resolved), kind)


# --- readers --------------------------------------------------------------------------------
def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"corpus {path} is not a readable Parquet file: {err}") from err


def _read_jsonl(path: Path) -> pa.Table:
    import pyarrow.json as pj

    try:
        return pj.read_json(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(
            f"corpus {path} is not valid JSONL (one JSON object per line, same type per key): {err}"
        ) from err


def _read_npz(path: Path) -> pa.Table:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError) as err:
        raise CorpusError(
            f"corpus {path} is not a readable .npz without pickled objects: {err}"
        ) from err
    renames = {"ids": "id", "x": "features", "X": "features", "y": "label", "labels": "label",
               "targets": "target"}
    columns: dict[str, pa.Array] = {}
    n = None
    for name, array in arrays.items():
        name = renames.get(name, name)
        if n is None:
            n = array.shape[0] if array.ndim else 0
        if array.ndim == 0 or array.shape[0] != n:
            raise CorpusError(
                f"corpus {path}: array {name!r} has shape {array.shape}; every array needs one "
                f"row per record ({n})"
            )
        columns[name] = _numpy_column(array)
    return pa.table(columns)


def _numpy_column(array: np.ndarray) -> pa.Array:
    if array.ndim == 1:
        return pa.array(array)
    flat = pa.array(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


# --- ids, inputs, targets ---------------------------------------------------------------
def _ids(table: pa.Table) -> np.ndarray:
    if "id" not in table.column_names:
        raise CorpusError(
            f"the corpus has no 'id' column (columns: {table.column_names}); every record needs a "
            "stable unique id"
        )
    column = table.column("id")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_integer(column.type)):
        raise CorpusError(f"'id' must hold strings or integers, not {column.type}")
    if column.null_count:
        rows = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[:5].tolist()
        raise CorpusError(f"{column.null_count} record(s) have no id (rows {rows}); give every record one")
    ids = np.asarray([str(v) for v in column.to_pylist()], dtype=object)
    if any(not i for i in ids):
        raise CorpusError("ids must not be empty strings")
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    if len(unique) != len(ids):
        dupes = unique[counts > 1][:5].tolist()
        raise CorpusError(f"{int((counts > 1).sum())} id(s) occur more than once, e.g. {dupes}; ids must be unique")
    return ids


def _inputs(
    table: pa.Table, ids: np.ndarray, task: str, tokenizer: Tokenizer | None,
    max_length: int | None, pad_id: int = 0,
) -> tuple[np.ndarray, str, list[str], list[int] | None]:
    """Inputs, their kind, the columns used, and token counts before padding (tokens only)."""
    names = table.column_names
    if "features" in names:
        x = _list_to_numpy(table.column("features"), "features", ids)
        return _numeric(x, "features", ids), "features", ["features"], None
    xcols = sorted((c for c in names if _X_COLUMN.match(c)), key=lambda c: int(_X_COLUMN.match(c)[1]))
    if xcols:
        parts = []
        for c in xcols:
            column = table.column(c)
            if column.null_count:
                raise CorpusError(f"input column {c!r} has {column.null_count} missing value(s)")
            parts.append(_numeric(column.to_numpy(), c, ids))
        return np.stack(parts, axis=1).astype(np.float32), "columns", xcols, None
    if "input_ids" in names:
        tokens = _ragged_ints(table.column("input_ids"), "input_ids", ids)
        return _pad(tokens, pad_id, max_length), "tokens", ["input_ids"], [len(t) for t in tokens]
    if "text" in names:
        if tokenizer is None:
            raise CorpusError(
                "the corpus has a 'text' column but the model card names no tokenizer; add "
                "'tokenizer: <local HF tokenizer dir>' to the card or give 'input_ids'"
            )
        texts = table.column("text")
        if texts.null_count:
            raise CorpusError(f"'text' has {texts.null_count} missing value(s)")
        tokens = [np.asarray(t, dtype=np.int64) for t in tokenizer(texts.to_pylist())]
        return _pad(tokens, pad_id, max_length), "text", ["text"], [len(t) for t in tokens]
    raise CorpusError(
        f"no inputs found among columns {names}; give a 'features' list column, numeric columns "
        "x0, x1, ..., 'input_ids' or 'text'"
    )


def _list_to_numpy(column: pa.ChunkedArray, name: str, ids: np.ndarray) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        rows = np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[:5]
        raise CorpusError(f"{name!r} is missing for ids {ids[rows].tolist()}")
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
        if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
            return array.to_numpy(zero_copy_only=False)[:, None]
        raise CorpusError(f"{name!r} must be a list of numbers per record, not {array.type}")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(set(lengths.tolist())) > 1:
        common = np.bincount(lengths).argmax()
        bad = np.flatnonzero(lengths != common)[:5]
        raise CorpusError(
            f"{name!r} is ragged: most records have {common} values but ids "
            f"{ids[bad].tolist()} have {lengths[bad].tolist()}; give every record the same shape"
        )
    inner_ids = np.repeat(ids, lengths)
    values = array.flatten()
    inner = _list_to_numpy(values, name, inner_ids) if _is_list(values.type) else values
    if isinstance(inner, pa.Array):
        if inner.null_count:
            raise CorpusError(f"{name!r} contains missing values")
        inner = inner.to_numpy(zero_copy_only=False)
    return inner.reshape(len(array), int(lengths[0]) if len(lengths) else 0, *inner.shape[1:])


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric(x: np.ndarray, name: str, ids: np.ndarray) -> np.ndarray:
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise CorpusError(f"{name!r} must hold numbers, not {x.dtype}")
    x = x.astype(np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        bad = ids[np.flatnonzero(~finite)[:5]].tolist()
        raise CorpusError(f"{name!r} has NaN or infinite values for ids {bad}")
    return x


def _ragged_ints(column: pa.ChunkedArray, name: str, ids: np.ndarray) -> list[np.ndarray]:
    rows = column.to_pylist()
    out = []
    for i, row in enumerate(rows):
        if not row:
            raise CorpusError(f"{name!r} is empty or missing for id {ids[i]}")
        arr = np.asarray(row)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise CorpusError(f"{name!r} of id {ids[i]} must be a flat list of integer token ids")
        out.append(arr.astype(np.int64))
    return out


def _pad(rows: list[np.ndarray], value: int, max_length: int | None) -> np.ndarray:
    length = max(len(r) for r in rows)
    if max_length is not None:
        length = min(length, max_length)
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = r
    return out


def _reshape(x: np.ndarray, shape: list[int], kind: str) -> np.ndarray:
    per_row = int(np.prod(x.shape[1:]))
    if per_row != int(np.prod(shape)):
        raise CorpusError(
            f"inputs have {per_row} values per record, which cannot be reshaped to the card's "
            f"input_shape {shape}"
        )
    return x.reshape(len(x), *shape)


def _targets(
    table: pa.Table, ids: np.ndarray, task: str, x: np.ndarray, lengths: list[int] | None
) -> tuple[np.ndarray, list[str]]:
    names = table.column_names
    if task == "causal-lm":
        if lengths is None:
            raise CorpusError("a causal-LM corpus needs 'input_ids' or 'text' inputs")
        if "labels" not in names:  # the whole sequence is the target; padding is ignored
            y = x.copy()
            for i, n in enumerate(lengths):
                y[i, n:] = IGNORE_INDEX
            return y, []
        labels = _ragged_ints(table.column("labels"), "labels", ids)
        y = _pad(labels, IGNORE_INDEX, x.shape[1])
        if y.shape != x.shape:
            raise CorpusError("causal-LM 'labels' must be as long as the inputs of each record")
        return y, ["labels"]
    column_name = "label" if task == "classification" else "target"
    if column_name not in names and task == "regression" and "label" in names:
        column_name = "label"
    if column_name not in names:
        raise CorpusError(f"a {task} corpus needs a {column_name!r} column (columns: {names})")
    column = table.column(column_name)
    if column.null_count:
        rows = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[:5]
        raise CorpusError(f"{column_name!r} is missing for ids {ids[rows].tolist()}")
    y = column.to_numpy()
    if not np.issubdtype(y.dtype, np.number):
        raise CorpusError(f"{column_name!r} must hold numbers, not {column.type}")
    if task == "classification":
        if np.issubdtype(y.dtype, np.floating) and not np.array_equal(y, np.round(y)):
            bad = ids[np.flatnonzero(y != np.round(y))[:5]].tolist()
            raise CorpusError(f"class labels must be integers; ids {bad} are not")
        if (y < 0).any():
            raise CorpusError(f"class labels must be ≥ 0; ids {ids[np.flatnonzero(y < 0)[:5]].tolist()} are not")
        return y.astype(np.int64), [column_name]
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise CorpusError(f"{column_name!r} has NaN or infinite values for ids {ids[~np.isfinite(y)][:5].tolist()}")
    return y, [column_name]


def hf_tokenizer(directory: str) -> Tokenizer:
    """A tokenizer callable from a local Hugging Face directory (never downloads)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
