"""The service's CLI commands (mounted on `tda` by service.cli) against the running system."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from service.commands import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_query_jobs_and_keys_commands(world, tmp_path):
    runner = CliRunner()
    env = {"TDA_URL": world.url, "TDA_API_KEY": world.admin}
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps({"x": world.data.test_x[:1].tolist(),
                                    "y": world.data.test_y[:1].tolist()}))
    result = runner.invoke(_app(), ["query", "digits", "-e", f"@{examples}", "-k", "3", "--json"],
                           env=env)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["results"][0]["proponents"]) == 3

    result = runner.invoke(_app(), ["jobs", "submit", "mislabel", '{"index": "digits"}', "--wait"],
                           env=env)
    assert result.exit_code == 0, result.output
    assert '"state": "succeeded"' in result.output
    result = runner.invoke(_app(), ["jobs", "status", "no-such-job"], env=env)
    assert result.exit_code == 1 and "404" in result.output

    local = {"TDA_DATA_DIR": str(tmp_path)}  # restored by the runner afterwards
    result = runner.invoke(_app(), ["keys", "create", "--tenant", "cli-test", "--scopes", "read"],
                           env=local)
    assert result.exit_code == 0 and result.output.startswith("tda_")
    listed = runner.invoke(_app(), ["keys", "list"], env=local)
    assert '"tenant": "cli-test"' in listed.output and result.output.strip() not in listed.output
