"""AirRep through ``tda index build``: a trained encoder as a method argument, index = engine."""

from __future__ import annotations

import numpy as np
import pytest
from indexer_fixtures import Setup, engine_task

from attribution.evaluate import SubsetPlan, retrain_on_subsets
from attribution.methods import AirRep
from attribution.models import build
from attribution.tasks import ClassificationTask
from attribution.training import TrainConfig
from indexer.build import build_index
from indexer.errors import IndexerError
from indexer.index import AttributionIndex
from indexer.paths import sha256_file

DIM = 16


@pytest.fixture(scope="module")
def encoder_path(setup: Setup):
    """An encoder trained briefly on 6 retrained subsets (dev = the 40 'more' records)."""
    plan = SubsetPlan(len(setup.train), 0.5, 6, seed=3)
    results = retrain_on_subsets(
        plan,
        lambda seed: build("mlp", hidden=32, seed=seed),
        ClassificationTask,
        setup.train,
        setup.more,
        TrainConfig(epochs=10, learning_rate=1e-2, num_threads=1),
        progress=False,
    )
    method = AirRep(
        engine_task(setup),
        device="cpu",
        features="model",
        dim=DIM,
        subsets=results,
        dev=setup.more,
        steps=5,
        learning_rate=1e-4,
    ).fit(setup.train)
    path = setup.root / "encoders" / "airrep.safetensors"
    path.parent.mkdir(exist_ok=True)
    return method.save(path)


def _build(setup: Setup, root, encoder, name: str = "airrep"):
    return build_index(
        setup.card,
        setup.corpus,
        name=name,
        root=root,
        method="airrep",
        method_args={"encoder": encoder},
        shard_size=100,
        dtype="float32",
        data_root=setup.root,
        show_progress=False,
        recall_queries=20,
    )


def test_airrep_index_scores_equal_engine_scores(setup: Setup, encoder_path, tmp_path) -> None:
    result = _build(setup, tmp_path, "encoders/airrep.safetensors")  # relative to the data root
    index = AttributionIndex.open(result.path)
    engine = AirRep.load(encoder_path, engine_task(setup), device="cpu").fit(setup.train)
    expected = engine.score(setup.test)
    got = index.scores_for(index.query_vectors(setup.test), index.ids)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    recorded = index.manifest["encoder"]
    assert recorded["path"] == str(encoder_path.resolve())
    assert recorded["sha256"] == sha256_file(encoder_path)
    assert recorded["dim"] == DIM and recorded["features"] == "model"
    assert index.manifest["dim"] == DIM and index.manifest["method"]["name"] == "airrep"


def test_airrep_encoder_bad_input(setup: Setup, encoder_path, tmp_path) -> None:
    _build(setup, tmp_path, str(encoder_path))
    other = AirRep(engine_task(setup), device="cpu", features="model", dim=DIM + 4)
    other.fit(setup.train)
    wider = other.save(setup.root / "encoders" / "wider.safetensors")
    with pytest.raises(IndexerError, match="dimension is 20 but index airrep"):
        _build(setup, tmp_path, str(wider))
    with pytest.raises(IndexerError, match="outside the data root"):
        _build(setup, tmp_path, "../elsewhere.safetensors", name="other")
    with pytest.raises(IndexerError, match="does not exist"):
        _build(setup, tmp_path, "encoders/missing.safetensors", name="other")
    with pytest.raises(IndexerError, match="takes no encoder"):
        build_index(
            setup.card,
            setup.corpus,
            name="t",
            root=tmp_path,
            method="trak",
            method_args={"encoder": str(encoder_path)},
            data_root=setup.root,
            show_progress=False,
        )


def test_airrep_ensemble_encoder_through_the_index(setup: Setup, tmp_path) -> None:
    """An encoder over both checkpoints and both layers: built, stored and served like any other."""
    method = AirRep(
        engine_task(setup), device="cpu", features="model", dim=DIM, ensemble=2, layers=2
    ).fit(setup.train)
    path = method.save(setup.root / "encoders" / "ensemble.safetensors")
    result = _build(setup, tmp_path, "encoders/ensemble.safetensors", name="ensemble")
    index = AttributionIndex.open(result.path)
    engine = AirRep.load(path, engine_task(setup), device="cpu").fit(setup.train)
    assert (engine.args.ensemble, engine.args.layers) == (2, 2)
    expected = engine.score(setup.test)
    got = index.scores_for(index.query_vectors(setup.test), index.ids)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    recorded = index.manifest["encoder"]
    assert recorded["members"] == 2 and recorded["blocks"] == [[10, 33], [32, 65]] * 2
    assert index.manifest["dim"] == DIM
