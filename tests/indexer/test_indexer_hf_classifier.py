"""An index of a local Hugging Face GPT-2 classifier directory (padded token inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from attribution import TRAK, ClassificationTask
from indexer.build import build_index
from indexer.index import AttributionIndex
from tests.attribution.test_hf_classifier import gpt2_classifier, padded_tokens


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("pad", [0, 30])
def test_hf_gpt2_classifier_directory_indexes_and_answers_topk(tmp_path: Path, pad: int) -> None:
    """The ragged corpus is padded with the model's own pad id (the classifier pools the last
    non-pad token), so index answers equal the engine's on the same model-padded inputs."""
    x, y, lengths = padded_tokens(12, seed=3)
    for i, n in enumerate(lengths):
        x[i, n:] = pad
    pq.write_table(pa.table({
        "id": [f"doc-{i}" for i in range(12)],
        "input_ids": [x[i, :n].tolist() for i, n in enumerate(lengths)],  # ragged: padded on load
        "label": y.tolist(),
    }), tmp_path / "docs.parquet")
    gpt2_classifier(pad_token_id=pad).save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(
        {"task": "classification", "architecture": {"huggingface": "hf"}}))
    result = build_index(tmp_path / "card.yaml", tmp_path / "docs.parquet", name="cls",
                         root=tmp_path / "ix", method="trak", method_args={"proj_dim": 16},
                         shard_size=5, dtype="float32", show_progress=False, recall_queries=4,
                         data_root=tmp_path, self_influence=False)
    index = AttributionIndex.open(result.path)
    assert index.manifest["projection"]["vectorized"] is False  # vmap fell back, reason kept
    width = max(lengths)
    query = (x[:2, :width], y[:2])
    top = index.topk(index.query_vectors(query), k=3)
    # the same scores as the engine fitted in memory on the padded corpus
    engine = TRAK(ClassificationTask(gpt2_classifier(pad_token_id=pad)), proj_dim=16)
    engine.fit((x[:, :width], y))
    scores = engine.score(query)
    for row in range(2):
        expected = [f"doc-{i}" for i in np.argsort(-scores[row])[:3]]
        assert list(top.ids[row]) == expected
        np.testing.assert_allclose(top.scores[row], np.sort(scores[row])[::-1][:3], rtol=1e-3)
