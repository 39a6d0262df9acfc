"""``tda index ...``: build, inspect, query and update attribution indexes from the shell.

Mounted by the top-level CLI with ``app.add_typer(index_app, name="index")``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.table import Table

from indexer.errors import IndexerError

index_app = typer.Typer(help="Build and query versioned attribution indexes.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def default_root() -> Path:
    """``$TDA_INDEX_ROOT``, else ``$TDA_DATA_DIR/indexes``, else ``./.tda/indexes``."""
    if os.environ.get("TDA_INDEX_ROOT"):
        return Path(os.environ["TDA_INDEX_ROOT"])
    if os.environ.get("TDA_DATA_DIR"):
        return Path(os.environ["TDA_DATA_DIR"]) / "indexes"
    return Path(".tda") / "indexes"


RootOption = Annotated[Path | None, typer.Option("--root", help="Index root (default: $TDA_INDEX_ROOT, $TDA_DATA_DIR/indexes or ./.tda/indexes).")]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", envvar="TDA_DATA_ROOT", help="Confine model, checkpoint and corpus paths to this directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``key=value`` pairs with YAML-typed values (``512`` → int, ``null`` → None, ``[0,1]``)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise IndexerError(f"{what} {pair!r} must look like key=value")
        result[key.strip()] = yaml.safe_load(value)
    return result


def _fail(err: Exception) -> None:
    err_console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(code=2)


@index_app.command("build")
def build_command(
    model: Annotated[Path, typer.Option("--model", help="Model card (YAML/JSON).")],
    corpus: Annotated[Path, typer.Option("--corpus", help="Training corpus (.parquet, .jsonl, .npz).")],
    name: Annotated[str, typer.Option("--name", help="Index name.")],
    method: Annotated[str, typer.Option("--method", help="trak, tracin, graddot, gradcos or influence.")] = "trak",
    arg: Annotated[list[str] | None, typer.Option("--arg", help="Method argument key=value, repeatable (e.g. proj_dim=512).")] = None,
    shard_size: Annotated[int, typer.Option(help="Records per featurization shard (the resume unit).")] = 4096,
    dtype: Annotated[str, typer.Option(help="Stored vector dtype: float16 or float32.")] = "float16",
    index_kind: Annotated[str, typer.Option(help="auto, flat, ivf_flat, ivf_pq or hnsw.")] = "auto",
    index_param: Annotated[list[str] | None, typer.Option("--index-param", help="FAISS parameter key=value (nlist, nprobe, m, M, ...).")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device for featurization (default: cuda if present).")] = None,
    self_influence: Annotated[bool, typer.Option(help="Also store self-influence per record.")] = True,
    recall_target: Annotated[float, typer.Option(help="recall@10 the approximate index is tuned to.")] = 0.95,
    recall_queries: Annotated[int, typer.Option(help="Sampled records whose query vectors measure recall.")] = 200,
    force: Annotated[bool, typer.Option(help="Rebuild even if this exact build is already published.")] = False,
    root: RootOption = None,
    data_root: DataRootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Featurize a corpus with a model and publish a new index version (resumes if interrupted)."""
    from indexer.build import build_index

    try:
        result = build_index(
            model, corpus, name=name, root=root or default_root(), method=method,
            method_args=parse_pairs(arg, "--arg"), shard_size=shard_size, dtype=dtype,
            index_kind=index_kind, index_params=parse_pairs(index_param, "--index-param") or None,
            data_root=data_root, device=device, self_influence=self_influence,
            recall_target=recall_target, recall_queries=recall_queries, force=force,
            show_progress=not as_json,
        )
    except (IndexerError, OSError) as err:
        _fail(err)
    m = result.manifest
    if as_json:
        console.print_json(json.dumps({"path": str(result.path), "version": result.version,
                                       "reused": result.reused, "resumed_shards": result.resumed_shards}))
        return
    state = "already published" if result.reused else f"built in {m['build']['seconds']:.1f} s"
    console.print(
        f"[green]{name}@{result.version}[/green] {state}: {m['counts']['live']} records, dim "
        f"{m['dim']} {m['dtype']}, {m['faiss']['kind']} index, recall@{m['faiss']['recall']['k']} "
        f"{m['faiss']['recall']['recall']:.3f}"
        + (f", {result.resumed_shards} shard(s) resumed" if result.resumed_shards else "")
    )
    if m.get("verbatim"):
        v = m["verbatim"]
        console.print(f"  + verbatim-span index (provenance): {v['num_tokens']} tokens of "
                      f"{v['num_documents']} documents, {v['token_dtype']}")
    console.print(f"  {result.path}")


@index_app.command("info")
def info_command(
    name: Annotated[str, typer.Argument(help="Index name (name@version for an older one) or path.")],
    root: RootOption = None,
    verify: Annotated[bool, typer.Option(help="Also check every file's sha256.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Manifest summary: method, counts, sizes, recall of the approximate index, drift."""
    from indexer.index import AttributionIndex

    try:
        index = AttributionIndex.open(name, root or default_root())
        if verify:
            index.verify()
        info = index.info()
    except IndexerError as err:
        _fail(err)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table(title=f"{info['name']}@{info['version']}", show_header=False)
    recall = info["faiss"]["recall"]
    rows = [
        ("path", info["path"]),
        ("method", f"{info['method']} {json.dumps(info['arguments'], default=str)}"),
        ("projection", json.dumps(info["projection"], default=str)),
        ("lambda", json.dumps(info["lambda"], default=str)),
        ("model", f"{info['task']} sha256 {info['model_sha256'][:16]}…"),
        ("corpus", f"sha256 {info['corpus_sha256'][:16]}…"),
        ("records", f"{info['counts']['live']} live / {info['counts']['rows']} rows "
                    f"(+{info['counts']['added']} added, −{info['counts']['deleted']} deleted)"),
        ("vectors", f"dim {info['dim']} {info['dtype']}, {info['bytes_on_disk'] / 2**20:.1f} MiB on disk "
                    f"({info['bytes_per_vector']:.0f} B/record)"),
        ("faiss", f"{info['faiss']['kind']} {json.dumps(info['faiss']['params'])}"),
        ("recall", f"@{recall.get('k')}: {recall.get('recall', 1.0):.3f} on {recall.get('queries', 0)} queries"
                   + ("" if recall.get("target_reached", True) else
                      f" — below the target {recall.get('target')}: try hnsw or more nlist/m")),
        ("built", f"{info['built']} in {info['build_seconds']:.1f} s"),
        ("rebuild", info["drift"]["reason"] or "not needed"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _query_examples(index: Any, example: list[str] | None, examples: Path | None) -> tuple[list[str], Any]:
    """Examples from ``--example`` JSON objects or an ``--examples`` corpus file."""
    if examples is not None:
        from indexer.build import read_corpus

        corpus = read_corpus(examples, index.card, None)
        return corpus.ids.tolist(), corpus.examples()
    if not example:
        raise IndexerError("give --example '{\"features\": [...], \"label\": 3}' or --examples FILE")
    inputs, targets = [], []
    for i, text in enumerate(example):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as err:
            raise IndexerError(f"--example {i} is not JSON: {err}") from err
        x = next((item[k] for k in ("features", "input_ids", "x") if k in item), None)
        y = next((item[k] for k in ("label", "target", "labels", "y") if k in item), None)
        if x is None or y is None:
            raise IndexerError(f"--example {i} needs inputs ('features' or 'input_ids') and a 'label'/'target'")
        inputs.append(x)
        targets.append(y if "input_ids" not in item or "labels" in item else x)
    return [f"example-{i}" for i in range(len(inputs))], index.examples(np.asarray(inputs), np.asarray(targets))


@index_app.command("query")
def query_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    example: Annotated[list[str] | None, typer.Option("--example", help="JSON example, repeatable: {\"features\": [...], \"label\": 3}.")] = None,
    examples: Annotated[Path | None, typer.Option("--examples", help="A corpus file of query examples (with ids).")] = None,
    k: Annotated[int, typer.Option("--k", help="How many records per query.")] = 10,
    opponents: Annotated[bool, typer.Option(help="Also list the most negative (opponent) records.")] = False,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Top-k proponents (and opponents) of each example, with metadata."""
    from indexer.index import AttributionIndex

    try:
        index = AttributionIndex.open(name, root or default_root())
        names, data = _query_examples(index, example, examples)
        vectors = index.query_vectors(data)
        answers = {"proponents": index.topk(vectors, k)}
        if opponents:
            answers["opponents"] = index.topk(vectors, k, opponents=True)
        result = []
        for j, query in enumerate(names):
            entry: dict[str, Any] = {"query": query}
            for kind, top in answers.items():
                hits = top.hits(j)
                for hit, record in zip(hits, index.records([h["id"] for h in hits]), strict=True):
                    hit["metadata"] = {key: v for key, v in record.items() if key != "id"}
                entry[kind] = hits
            result.append(entry)
    except IndexerError as err:
        _fail(err)
    if as_json:
        console.print_json(json.dumps(result, default=str))
        return
    for entry in result:
        for kind in answers:
            table = Table(title=f"{entry['query']}: {kind}")
            for column in ("rank", "id", "score", "metadata"):
                table.add_column(column)
            for hit in entry[kind]:
                table.add_row(str(hit["rank"]), hit["id"], f"{hit['score']:.4g}", json.dumps(hit["metadata"], default=str))
            console.print(table)


@index_app.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    corpus: Annotated[Path, typer.Option("--corpus", help="Records to add (ids must be new).")],
    root: RootOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Add records without a rebuild (the fitted method state is kept); publishes a new version."""
    from indexer.update import add_records

    try:
        index = add_records(name, corpus, root=root or default_root(), data_root=data_root)
    except IndexerError as err:
        _fail(err)
    _report_update(index)


@index_app.command("delete")
def delete_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    ids: Annotated[str, typer.Option("--ids", help="Comma-separated ids to delete.")],
    root: RootOption = None,
) -> None:
    """Delete records by id (tombstones); publishes a new version."""
    from indexer.update import delete_records

    try:
        index = delete_records(name, [i.strip() for i in ids.split(",") if i.strip()], root=root or default_root())
    except IndexerError as err:
        _fail(err)
    _report_update(index)


@index_app.command("reindex")
def reindex_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    index_kind: Annotated[str, typer.Option(help="auto, flat, ivf_flat, ivf_pq or hnsw.")] = "auto",
    index_param: Annotated[list[str] | None, typer.Option("--index-param", help="FAISS parameter key=value.")] = None,
    root: RootOption = None,
) -> None:
    """Rebuild only the FAISS index over the stored vectors (e.g. after growth); new version."""
    from indexer.update import rebuild_faiss

    try:
        index = rebuild_faiss(name, index_kind, parse_pairs(index_param, "--index-param") or None,
                              root=root or default_root())
    except IndexerError as err:
        _fail(err)
    _report_update(index)


@index_app.command("tune")
def tune_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    recall_target: Annotated[float | None, typer.Option(help="recall@10 to reach (default: the build's).")] = None,
    root: RootOption = None,
) -> None:
    """Re-choose nprobe / efSearch for a recall target, without rebuilding; new version."""
    from indexer.update import retune

    try:
        index = retune(name, recall_target, root=root or default_root())
    except IndexerError as err:
        _fail(err)
    _report_update(index)


@index_app.command("prune")
def prune_command(
    name: Annotated[str, typer.Argument(help="Index name or path.")],
    keep: Annotated[int, typer.Option(help="How many of the newest versions to keep.")] = 3,
    root: RootOption = None,
) -> None:
    """Remove old versions (the current one is always kept)."""
    from indexer.update import prune_versions

    try:
        removed = prune_versions(name, keep, root=root or default_root())
    except IndexerError as err:
        _fail(err)
    console.print(f"removed {', '.join(removed) if removed else 'nothing'}")


def _report_update(index: Any) -> None:
    m = index.manifest
    console.print(f"[green]{index.name}@{index.version}[/green]: {m['counts']['live']} live records, "
                  f"recall@{m['faiss']['recall']['k']} {m['faiss']['recall']['recall']:.3f}")
    if m["drift"]["rebuild_advised"]:
        console.print(f"[yellow]rebuild advised:[/yellow] {m['drift']['reason']}")


if __name__ == "__main__":  # pragma: no cover
    index_app()
