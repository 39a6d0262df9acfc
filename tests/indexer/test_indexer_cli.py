"""The ``tda index`` commands end to end, through Typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

from indexer_fixtures import Setup
from typer.testing import CliRunner

from indexer.cli import index_app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(index_app, list(args))
    return result


def test_cli_build_info_query_add_delete(setup: Setup, tmp_path: Path) -> None:
    root = str(tmp_path / "indexes")
    built = invoke("build", "--model", str(setup.card), "--corpus", str(setup.corpus), "--method", "graddot",
                   "--name", "cli", "--arg", "proj_dim=16", "--root", root, "--shard-size", "120",
                   "--no-self-influence", "--recall-queries", "30", "--data-root", str(setup.root), "--json")
    assert built.exit_code == 0, built.output
    assert json.loads(built.output)["version"] == "v0001"

    info = invoke("info", "cli", "--root", root, "--json", "--verify")
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["method"] == "graddot" and data["counts"]["live"] == 240 and data["faiss"]["kind"] == "flat"
    assert "recall" in invoke("info", "cli", "--root", root).output

    example = json.dumps({"features": setup.test.x[0].tolist(), "label": int(setup.test.y[0])})
    query = invoke("query", "cli", "--root", root, "--example", example, "--k", "3", "--opponents", "--json")
    assert query.exit_code == 0, query.output
    answer = json.loads(query.output)[0]
    assert [h["rank"] for h in answer["proponents"]] == [1, 2, 3]
    assert answer["opponents"][0]["score"] < 0 < answer["proponents"][0]["score"]
    assert answer["proponents"][0]["metadata"]["license"] == "bsd-3"
    table = invoke("query", "cli", "--root", root, "--examples", str(setup.extra), "--k", "2")
    assert table.exit_code == 0 and "extra-0000: proponents" in table.output

    added = invoke("add", "cli", "--root", root, "--corpus", str(setup.extra))
    assert added.exit_code == 0 and "cli@v0002" in added.output and "280 live" in added.output
    deleted = invoke("delete", "cli", "--root", root, "--ids", "d-0000,extra-0001")
    assert deleted.exit_code == 0 and "cli@v0003" in deleted.output and "278 live" in deleted.output
    reindexed = invoke("reindex", "cli", "--root", root, "--index-kind", "ivf_flat", "--index-param", "nlist=4")
    assert reindexed.exit_code == 0 and "cli@v0004" in reindexed.output, reindexed.output
    pruned = invoke("prune", "cli", "--root", root, "--keep", "2")
    assert pruned.exit_code == 0 and "v0001, v0002" in pruned.output
    after = json.loads(invoke("info", "cli", "--root", root, "--json").output)
    assert after["version"] == "v0004" and after["faiss"]["kind"] == "ivf_flat" and after["counts"]["live"] == 278


def test_cli_errors_are_clear(setup: Setup, tmp_path: Path) -> None:
    root = str(tmp_path / "indexes")
    missing = invoke("info", "nope", "--root", root)
    assert missing.exit_code == 2 and "no index named 'nope'" in missing.output
    bad = invoke("build", "--model", str(setup.card), "--corpus", str(setup.corpus), "--name", "x",
                 "--root", root, "--arg", "proj_dim")
    assert bad.exit_code == 2 and "key=value" in bad.output
    escape = invoke("build", "--model", str(setup.card), "--corpus", str(setup.corpus), "--name", "x",
                    "--root", root, "--data-root", str(tmp_path))
    assert escape.exit_code == 2 and "outside the data root" in escape.output
