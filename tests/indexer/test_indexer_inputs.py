"""Model cards, corpora and path confinement: every problem found before any work starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from indexer_fixtures import Setup

from indexer.cards import load_card, load_task, model_fingerprint, parse_card, register_architecture
from indexer.corpus import load_corpus
from indexer.errors import CardError, CorpusError, IndexerError
from indexer.paths import confine


# --- paths ----------------------------------------------------------------------------------
def test_confine(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert confine("sub/a.txt", root, base=root) == (root / "sub" / "a.txt").resolve()
    with pytest.raises(IndexerError, match="outside the data root"):
        confine("../secret", root, base=root / "sub" / "..")
    with pytest.raises(IndexerError, match="outside the data root"):
        confine("/etc/passwd", root)
    os.symlink("/etc", root / "link")
    with pytest.raises(IndexerError, match="outside the data root"):
        confine("link/passwd", root, base=root)
    assert confine("/etc/passwd", None) == Path("/etc/passwd").resolve()


# --- cards ----------------------------------------------------------------------------------
def test_card_loads_and_resolves(setup: Setup) -> None:
    card = load_card(setup.card, data_root=setup.root)
    assert card.task == "classification" and card.architecture.builtin == "mlp"
    assert [Path(c.path) for c in card.checkpoints] == [p.resolve() for p in setup.checkpoints]
    assert card.learning_rates() is not None and len(card.learning_rates()) == 2
    task = load_task(card)
    assert task.kind == "classification" and len(task.checkpoints) == 2
    fp = model_fingerprint(card)
    assert len(fp["sha256"]) == 64 and fp["checkpoints"][0]["step"] == card.checkpoints[0].step


def test_card_reports_every_problem_by_field(setup: Setup, tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"pickle")
    card = tmp_path / "bad.yaml"
    card.write_text(json.dumps({
        "task": "ranking",
        "architecture": {"builtin": "mlp", "entry_point": "x"},
        "checkpoints": [{"path": "weights.pt", "learning_rate": -1}],
        "colour": "red",
    }))
    with pytest.raises(CardError) as info:
        load_card(card)
    text = str(info.value)
    for fragment in ("task:", "architecture:", "exactly one", "checkpoints.0.learning_rate", "colour"):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 4

    card.write_text(
        "task: classification\narchitecture: {builtin: mlp}\ncheckpoints:\n"
        "  - {path: weights.pt}\n  - {path: missing.safetensors}\n  - {path: ../../outside.safetensors}\n"
    )
    with pytest.raises(CardError) as info:
        load_card(card, data_root=tmp_path)
    text = str(info.value)
    assert "checkpoints.0.path" in text and "pickle" in text
    assert "checkpoints.1.path" in text and "does not exist" in text
    assert "checkpoints.2.path" in text and "outside the data root" in text

    with pytest.raises(CardError, match="at least one checkpoint"):
        parse_card("task: regression\narchitecture: {builtin: mlp}\n")
    with pytest.raises(CardError, match="not valid YAML"):
        parse_card("task: [unclosed")


def test_binary_card_is_a_card_error(tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CardError, match="not UTF-8"):
        load_card(card)


def test_entry_point_must_be_registered(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    checkpoint = setup.checkpoints[0]
    text = (f"task: classification\narchitecture: {{entry_point: my-mlp, config: {{hidden: 32}}}}\n"
            f"checkpoints: [{{path: {checkpoint}}}]\n")
    card = tmp_path / "ep.yaml"
    card.write_text(text)
    with pytest.raises(CardError, match="not a registered architecture"):
        load_card(card)
    card.write_text(text.replace("my-mlp", "os:system"))
    with pytest.raises(CardError, match="not a registered architecture"):
        load_card(card)
    monkeypatch.setattr("indexer.cards._REGISTRY", {})
    register_architecture("my-mlp", "attribution.models:mlp")
    card.write_text(text)
    task = load_task(load_card(card))
    assert isinstance(task.model, torch.nn.Module)
    monkeypatch.setenv("TDA_ARCHITECTURES", "env-mlp=attribution.models:mlp")
    card.write_text(text.replace("my-mlp", "env-mlp"))
    assert load_card(card).architecture.entry_point == "env-mlp"


# --- corpora --------------------------------------------------------------------------------
def _write(tmp_path: Path, name: str, table: pa.Table) -> Path:
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def test_three_formats_agree(setup: Setup, tmp_path: Path) -> None:
    parquet = load_corpus(setup.corpus, "classification")
    rows = [{"id": i, "features": f, "label": y, "source": s}
            for i, f, y, s in zip(parquet.ids, parquet.x.tolist(), parquet.y.tolist(),
                                  parquet.metadata.column("source").to_pylist(), strict=True)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    npz = tmp_path / "c.npz"
    np.savez(npz, id=parquet.ids.astype(str), x=parquet.x, y=parquet.y)
    for path in (jsonl, npz):
        other = load_corpus(path, "classification")
        assert other.ids.tolist() == parquet.ids.tolist()
        np.testing.assert_array_equal(other.x, parquet.x)
        np.testing.assert_array_equal(other.y, parquet.y)
    assert load_corpus(jsonl, "classification").metadata.column_names == ["source"]
    assert parquet.describe()["metadata_columns"] == ["source", "license"] and len(parquet.fingerprint) == 64
    # x0..xN columns, nested lists reshaped by the card's input_shape
    cols = _write(tmp_path, "cols.parquet", pa.table({"id": [1, 2], "x0": [1.0, 2.0], "x1": [3, 4], "label": [0, 1]}))
    assert load_corpus(cols, "classification").x.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    nested = _write(tmp_path, "nested.parquet", pa.table({"id": ["a"], "features": [[[1.0, 2.0], [3.0, 4.0]]], "target": [0.5]}))
    loaded = load_corpus(nested, "regression", input_shape=[4])
    assert loaded.x.shape == (1, 4) and loaded.y.tolist() == [0.5]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"features": [[1.0], [2.0]], "label": [0, 1]}, "no 'id' column"),
        ({"id": ["a", "a", "b"], "features": [[1.0]] * 3, "label": [0, 1, 1]}, "more than once.*'a'"),
        ({"id": ["a", None], "features": [[1.0], [2.0]], "label": [0, 1]}, "have no id"),
        ({"id": ["a", "b", "c"], "features": [[1.0, 2.0], [1.0], [3.0, 4.0]], "label": [0, 1, 1]}, "ragged.*'b'"),
        ({"id": ["a"], "features": [["x", "y"]], "label": [0]}, "must hold numbers"),
        ({"id": ["a", "b"], "features": [[1.0], [float("nan")]], "label": [0, 1]}, "NaN.*'b'"),
        ({"id": ["a"], "features": [[1.0]], "label": [0.5]}, "integers"),
        ({"id": ["a"], "features": [[1.0]]}, "needs a 'label' column"),
        ({"id": ["a"], "label": [1]}, "no inputs found"),
        ({"id": [1.5], "features": [[1.0]], "label": [1]}, "strings or integers"),
    ],
    ids=["no-id", "dup-id", "null-id", "ragged", "strings", "nan", "float-label", "no-label",
         "no-inputs", "float-id"],
)
def test_bad_corpora(tmp_path: Path, table: dict, message: str) -> None:
    path = _write(tmp_path, "bad.parquet", pa.table(table))
    with pytest.raises(CorpusError, match=message):
        load_corpus(path, "classification")


def test_corpus_format_and_location_errors(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id\n1\n")
    with pytest.raises(CorpusError, match="unknown format"):
        load_corpus(tmp_path / "c.csv", "classification")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "features": [1.0], "label": 0}\n{broken\n')
    with pytest.raises(CorpusError, match="not valid JSONL"):
        load_corpus(tmp_path / "c.jsonl", "classification")
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "missing.parquet", "classification")
    np.savez(tmp_path / "obj.npz", id=np.array(["a"], dtype=object), x=np.ones((1, 2)), y=np.zeros(1))
    with pytest.raises(CorpusError, match="pickled"):
        load_corpus(tmp_path / "obj.npz", "classification")


def test_causal_lm_tokens_are_padded_and_masked(tmp_path: Path) -> None:
    path = _write(tmp_path, "lm.parquet", pa.table({"id": ["a", "b"], "input_ids": [[5, 6, 7], [8, 9]],
                                                     "url": ["u1", "u2"]}))
    corpus = load_corpus(path, "causal-lm")
    assert corpus.x.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert corpus.y.tolist() == [[5, 6, 7], [8, 9, -100]]
    assert corpus.metadata.column_names == ["url"]
