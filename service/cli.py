"""The ``tda`` console script: one entry point for every component.

Sub-commands import their component lazily, so ``tda eval`` never loads the web stack.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="tdaserve: which training examples made the model do this?", no_args_is_help=True
)
eval_app = typer.Typer(help="Measure attribution quality on built-in tasks.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _mount_components() -> None:
    """Mount the indexer's and the service's commands (serve, worker, query, jobs, demo …)."""
    from indexer.cli import index_app
    from service.commands import register

    app.add_typer(index_app, name="index")
    register(app)


@eval_app.command("lds")
def eval_lds(
    task: str = typer.Option("digits-mlp", help="built-in task: digits-mlp or digits-logreg"),
    methods: str = typer.Option(
        "",
        help="comma-separated subset of: graddot, gradcos, tracin, trak-512, influence-ekfac, influence-exact",
    ),
    models: int = typer.Option(
        5, min=1, help="independently trained models (TRAK/influence ensemble)"
    ),
    subsets: int = typer.Option(
        100, min=5, help="random training subsets retrained for the ground truth"
    ),
    alpha: float = typer.Option(
        0.5, min=0.05, max=0.95, help="fraction of the train set in each subset"
    ),
    cache: Path = typer.Option(Path(".tda/cache"), help="where the subset ground truth is cached"),
) -> None:
    """Linear datamodeling score of each method against models retrained on random subsets."""
    from service.reports import print_lds_table

    print_lds_table(task, methods, models, subsets, alpha, cache)


@eval_app.command("demo")
def engine_demo(
    top: int = typer.Option(3, min=1, max=20, help="proponents/opponents shown per prediction"),
    subsets: int = typer.Option(40, min=5, help="subsets retrained for the LDS column"),
) -> None:
    """Engine only: who made a digits model's predictions, and how good each method is."""
    from service.reports import run_engine_demo

    run_engine_demo(top=top, subsets=subsets)


_mount_components()

if __name__ == "__main__":
    app()
