"""`tda eval lds` end to end on a built-in task (small sizes)."""

from __future__ import annotations

from typer.testing import CliRunner

from service.cli import app


def test_eval_lds_prints_a_table(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "lds",
            "--task",
            "digits-logreg",
            "--subsets",
            "5",
            "--models",
            "1",
            "--methods",
            "graddot,trak-512",
            "--cache",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    assert "graddot" in result.output and "trak-512" in result.output
    assert list(tmp_path.glob("digits-logreg-5x0.5.npz")), "the ground truth is cached"


def test_eval_lds_rejects_unknown_method(tmp_path):
    result = CliRunner().invoke(
        app, ["eval", "lds", "--methods", "magic", "--cache", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "unknown method" in result.output
