"""Causal-LM corpora: a built-in tiny GPT-2 and a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file

from attribution import build_method
from attribution.models import build
from attribution.tasks import CausalLMTask
from indexer.build import build_index
from indexer.index import AttributionIndex

CONFIG = {"vocab_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16, "seed": 0}


def _corpus(path: Path) -> tuple[list[list[int]], Path]:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 31, size=int(rng.integers(4, 9))).tolist() for _ in range(12)]
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(12)], "input_ids": tokens,
                             "url": [f"https://example.org/{i}" for i in range(12)]}), path)
    return tokens, path


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_tiny_gpt2_builtin_and_huggingface_dir(tmp_path: Path) -> None:
    tokens, corpus = _corpus(tmp_path / "docs.parquet")
    model = build("tiny_gpt2", **CONFIG)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "lm.safetensors"))
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump({
        "task": "causal-lm", "architecture": {"builtin": "tiny_gpt2", "config": CONFIG},
        "checkpoints": [{"path": "lm.safetensors"}]}))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump({"task": "causal-lm", "architecture": {"huggingface": "hf"}}))

    results = {}
    for card in ("lm.yaml", "hf.yaml"):
        result = build_index(tmp_path / card, corpus, name=card[:2], root=tmp_path / "ix", method="graddot",
                             method_args={"proj_dim": 16}, shard_size=5, dtype="float32",
                             show_progress=False, recall_queries=4, data_root=tmp_path,
                             self_influence=False)
        results[card] = AttributionIndex.open(result.path)
    lm, hf = results["lm.yaml"], results["hf.yaml"]
    assert lm.manifest["corpus"]["input_kind"] == "tokens" and lm.dim == 16
    x = torch.tensor([tokens[0] + [0] * (8 - len(tokens[0]))])
    y = x.clone()
    y[0, len(tokens[0]):] = -100
    q = lm.query_vectors((x, y))
    top = lm.topk(q, k=3)
    assert top.ids[0][0] == "doc-0"
    assert lm.records(["doc-3"])[0]["url"] == "https://example.org/3"
    # the same weights through the Hugging Face directory give the same scores
    np.testing.assert_allclose(hf.scores_for(hf.query_vectors((x, y)), hf.ids), lm.scores_for(q, lm.ids), rtol=1e-4, atol=1e-7)
    # and both equal the engine on the padded corpus
    engine = build_method("graddot", CausalLMTask(build("tiny_gpt2", **CONFIG)), proj_dim=16)
    corpus_x = torch.from_numpy(np.stack([np.pad(t, (0, 8 - len(t))) for t in tokens]))
    corpus_y = corpus_x.clone()
    for i, t in enumerate(tokens):
        corpus_y[i, len(t):] = -100
    engine.fit((corpus_x, corpus_y))
    np.testing.assert_allclose(lm.scores_for(q, lm.ids), engine.score((x, y)), rtol=1e-4, atol=1e-7)
