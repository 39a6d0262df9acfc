"""Service commands for the ``tda`` console script (mounted by ``service.cli``).

``register(app)`` adds: ``serve``, ``worker``, ``query``, ``groups``, ``demo``, ``openapi`` and the groups
``jobs`` (submit, status, wait, result, subsets, cancel, list) and ``keys`` (create, list, revoke).
Client commands talk HTTP to ``--url`` (``TDA_URL``) with ``--key`` (``TDA_API_KEY``, or the
key `tda serve` saved in the data dir).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
Url = Annotated[str, typer.Option("--url", envvar="TDA_URL", help="API base URL.")]
Key = Annotated[str | None, typer.Option("--key", envvar="TDA_API_KEY",
                                         help="API key (default: the data dir's api-key file).")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data root (TDA_DATA_DIR).")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _env(**values: Any) -> None:
    """Apply CLI options as the environment variables the settings read."""
    for name, value in values.items():
        if value is not None:
            os.environ[f"TDA_{name.upper()}"] = str(value)
    from service.core.config import get_settings
    from worker.config import get_worker_settings

    get_settings.cache_clear()
    get_worker_settings.cache_clear()


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (TDA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TDA_PORT).")] = None,
    data_dir: DataDir = None,
    worker: Annotated[bool | None, typer.Option(
        "--worker/--no-worker", help="Start a worker process (default: only without REDIS_URL).")
    ] = None,
) -> None:
    """Run the API. Without REDIS_URL: also an embedded Redis and a worker (one machine)."""
    import uvicorn

    from service.core.config import get_settings
    from service.core.security import ensure_bootstrap_key
    from service.embedded import Embedded

    _env(host=host, port=port, data_dir=data_dir)
    settings = get_settings()
    embedded = not settings.redis_url
    system = Embedded(settings, worker=embedded if worker is None else worker)
    os.environ["REDIS_URL"] = system.start_redis()
    _env()
    if embedded:
        key, created = ensure_bootstrap_key(settings.data_dir)
        console.print(f"embedded Redis: {os.environ['REDIS_URL']} (persisted in "
                      f"{settings.data_dir / 'redis'})")
        if created:
            console.print(f"created an admin API key for tenant 'default' in "
                          f"{settings.data_dir / 'api-key'}")
    try:
        if system.run_worker:
            system.start_worker()
            console.print(f"worker started (log: {system.logs / 'worker.log'})")
        os.environ.update(system.prepare_metrics())  # before uvicorn starts its processes
        uvicorn.run("service.api.main:app", host=settings.host, port=settings.port,
                    access_log=False,
                    workers=settings.api_workers if settings.api_workers > 1 else None)
    finally:
        system.stop()


def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated: gpu,cpu (default both).")
                      ] = None,
    concurrency: Annotated[int | None, typer.Option(help="Processes (TDA_WORKER_CONCURRENCY).")
                           ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker (needs REDIS_URL). One per GPU: ``tda worker --queues gpu``."""
    from worker.config import get_worker_settings

    _env(worker_concurrency=concurrency)
    settings = get_worker_settings()
    if not settings.redis_url:
        console.print("[red]REDIS_URL is not set[/]: point it at the API's Redis, or use "
                      "`tda serve`, which runs a worker itself")
        raise typer.Exit(2)
    names = [settings.queues[q.strip()] for q in (queues or "gpu,cpu").split(",")]
    from worker.celery_app import app

    app.worker_main(["worker", "-Q", ",".join(names), "-c", str(settings.worker_concurrency),
                     "--loglevel", loglevel, "--without-mingle", "--without-gossip"])


def _client(url: str, key: str | None):  # type: ignore[no-untyped-def]
    from service.client import Client, default_key

    key = key or default_key()
    if not key:
        console.print("[red]no API key[/]: pass --key, set TDA_API_KEY, or run `tda serve` once")
        raise typer.Exit(2)
    return Client(url, key)


def _fail(err: Exception) -> None:
    console.print(f"[red]{err}[/]")
    raise typer.Exit(1)


def _load_json(value: str) -> Any:
    """JSON given inline, or ``@file.json``."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    return json.loads(text)


IndexName = Annotated[str, typer.Argument(help="Index name.")]
ExamplesJson = Annotated[str, typer.Option(
    "--examples", "-e", help='JSON {"x": [[...]], "y": [...]} or @file.json')]
AsJson = Annotated[bool, typer.Option("--json", help="Print the raw JSON.")]


def _ask(url: str, key: str | None, call: Any, as_json: bool) -> dict | None:
    """``call(client)``; prints the raw JSON and returns None with ``--json``."""
    from service.client import APIError

    with _client(url, key) as tda:
        try:
            answer = call(tda)
        except APIError as err:
            _fail(err)
    if as_json:
        console.print_json(json.dumps(answer))
        return None
    return answer


def query(
    index: IndexName,
    examples: ExamplesJson,
    k: Annotated[int, typer.Option("-k", help="Records per example.")] = 10,
    opponents: Annotated[bool, typer.Option(help="Also list the most harmful.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Top-k proponents (and opponents) of examples, from a published index.

    Examples are input rows ``{"x": [[...]], "y": [...]}`` or texts ``{"text": [...]}`` (for
    an index whose model card names a tokenizer; ``y`` for classification)."""
    from rich.table import Table

    data = _load_json(examples)
    answer = _ask(url, key, lambda tda: tda.topk(index, data.get("x"), data.get("y"), k=k,
                                                 opponents=opponents, text=data.get("text")),
                  as_json)
    if answer is None:
        return
    for j, result in enumerate(answer["results"]):
        table = Table("rank", "id", "score", "metadata",
                      title=f"example {j} — {answer['index']} {answer['version']}")
        for side in ("proponents", "opponents"):
            for hit in result.get(side) or []:
                meta = ", ".join(f"{k}={v}" for k, v in hit["metadata"].items()
                                 if not (isinstance(v, str) and len(v) > 40))
                table.add_row(f"{'+' if side == 'proponents' else '-'}{hit['rank']}", hit["id"],
                              f"{hit['score']:.4g}", meta)
        console.print(table)


def groups(
    index: IndexName,
    examples: ExamplesJson,
    group_list: Annotated[str | None, typer.Option("--groups", help=(
        'JSON list of groups or @file.json: [{"name": "a", "ids": [...]}, {"name": "threes", '
        '"label": 3}, {"name": "wiki", "field": "source", "value": "wiki"}]'))] = None,
    by: Annotated[str | None, typer.Option(
        "--by", help="One group per value of this metadata field ('label': per class).")] = None,
    pooling: Annotated[str | None, typer.Option(
        help="attention, sum or mean (default: attention for AirRep indexes, else sum).")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Best groups shown per example.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Which group of training records (source, label, id list) contributed most to each example."""
    from rich.table import Table

    data = _load_json(examples)
    chosen = _load_json(group_list) if group_list else None
    answer = _ask(url, key, lambda tda: tda.groups(index, data["x"], data.get("y"), chosen, by,
                                                   pooling, k), as_json)
    if answer is None:
        return
    for j, result in enumerate(answer["results"]):
        table = Table("rank", "group", "score", "size", title=f"example {j} — {answer['index']} "
                      f"{answer['version']} ({answer['pooling']} pooling)")
        for group in result["groups"]:
            table.add_row(str(group["rank"]), group["name"], f"{group['score']:.4g}",
                          str(group["size"]))
        console.print(table)


jobs_app = typer.Typer(help="Submit, follow and cancel jobs.", no_args_is_help=True)


def _show(job: dict) -> None:
    console.print_json(json.dumps(job))


@jobs_app.command("submit")
def jobs_submit(
    kind: Annotated[str, typer.Argument(help="attribution, valuation, mislabel, evaluate, "
                                              "subsets, build_index")],
    params: Annotated[str, typer.Argument(help="Parameters as JSON or @file.json")],
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for it, showing progress.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Submit a job; prints it (or waits for it with --wait)."""
    from service.client import APIError, JobFailed

    with _client(url, key) as tda:
        try:
            job = tda.submit(kind, _load_json(params), idempotency_key)
            console.print(f"job {job['id']} {job['state']} on queue {job['queue']}")
            if wait:
                job = _follow(tda, job["id"])
            _show(job)
        except (APIError, JobFailed) as err:
            _fail(err)


def _follow(tda: Any, job_id: str) -> dict:
    from rich.progress import Progress

    with Progress(console=console) as bar:
        task = bar.add_task("queued", total=1.0)
        return tda.wait(job_id, on_progress=lambda j: bar.update(
            task, completed=j["progress"]["fraction"], description=j["progress"]["stage"][:40]))


@jobs_app.command("status")
def jobs_status(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """State, progress, timestamps, error or result summary."""
    from service.client import APIError

    with _client(url, key) as tda:
        try:
            _show(tda.job(job_id))
        except APIError as err:
            _fail(err)


@jobs_app.command("wait")
def jobs_wait(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Wait for a job, showing its progress."""
    from service.client import APIError, JobFailed

    with _client(url, key) as tda:
        try:
            _show(_follow(tda, job_id))
        except (APIError, JobFailed) as err:
            _fail(err)


@jobs_app.command("result")
def jobs_result(job_id: str, offset: int = 0, limit: int = 20, url: Url = DEFAULT_URL,
                key: Key = None) -> None:
    """One page of a job's result table."""
    from service.client import APIError

    with _client(url, key) as tda:
        try:
            _show(tda.result(job_id, offset, limit))
        except APIError as err:
            _fail(err)


@jobs_app.command("subsets")
def jobs_subsets(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="The .npz to write.")],
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Save a finished `subsets` job as a SubsetResults .npz (for LDS and AirRep training)."""
    from service.client import APIError

    with _client(url, key) as tda:
        try:
            results = tda.subset_results(job_id)
        except (APIError, ValueError) as err:
            _fail(err)
    results.save(out)
    console.print(f"wrote {out}: {len(results)} subsets × {results.outputs.shape[1]} test examples")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a queued or running job."""
    from service.client import APIError

    with _client(url, key) as tda:
        try:
            _show(tda.cancel(job_id))
        except APIError as err:
            _fail(err)


@jobs_app.command("list")
def jobs_list(limit: int = 20, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Your most recent jobs."""
    from rich.table import Table

    from service.client import APIError

    with _client(url, key) as tda:
        try:
            page = tda.request("GET", "/v1/jobs", params={"limit": limit})
        except APIError as err:
            _fail(err)
    table = Table("id", "kind", "state", "progress", "created")
    for job in page["items"]:
        table.add_row(job["id"], job["kind"], job["state"],
                      f"{job['progress']['fraction']:.0%} {job['progress']['stage'][:30]}",
                      job["created_at"][:19])
    console.print(table)


keys_app = typer.Typer(help="API keys (stored hashed in the data dir).", no_args_is_help=True)


def _keys(data_dir: Path | None):  # type: ignore[no-untyped-def]
    from service.core.config import get_settings
    from service.core.security import KeyStore, key_file

    _env(data_dir=data_dir)
    return KeyStore(key_file(get_settings().data_dir))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: read,submit,admin")] = "read",
    name: Annotated[str, typer.Option(help="A note to recognise the key by.")] = "",
    data_dir: DataDir = None,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    try:
        key = _keys(data_dir).create(tenant, [s.strip() for s in scopes.split(",")], name)
    except ValueError as err:
        _fail(err)
    sys.stdout.write(key + "\n")


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """Key ids, tenants and scopes (never the keys)."""
    console.print_json(json.dumps(_keys(data_dir).list()))


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke the key with this id (from `tda keys list`)."""
    if not _keys(data_dir).revoke(key_id):
        _fail(ValueError(f"no single key with id {key_id!r}"))
    console.print(f"revoked {key_id}")


def openapi(output: Annotated[Path, typer.Option(help="Where to write it.")] = Path(
        "openapi/openapi.json")) -> None:
    """Export the OpenAPI document (a test fails when the committed one drifts)."""
    from service.openapi import export

    export(output)
    console.print(f"wrote {output}")


def demo(
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    keep_running: Annotated[bool, typer.Option(help="Keep serving afterwards.")] = False,
) -> None:
    """Train on digits, start the service, ask for top-k over HTTP, run a mislabel job."""
    from service.demo import run_demo

    run_demo(data_dir, port, keep_running=keep_running)


def register(app: typer.Typer, include_demo: bool = True) -> None:
    """Mount the service commands on the ``tda`` app (``demo`` replaces any earlier one)."""
    app.command()(serve)
    app.command()(worker)
    app.command()(query)
    app.command()(groups)
    if include_demo:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "demo"
                                      and getattr(c.callback, "__name__", "") != "demo"]
        app.command()(demo)
    app.command()(openapi)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(keys_app, name="keys")
