"""The ``learn`` command: one sub-command (group) per stage, each a thin call into the stage's entry point
(``encode_catalogue``, ``train_model``, ``evaluate_run``, ...).

Global options come before the sub-command: ``learn --set train.epochs=3 --config my.yaml train ...``.
Heavy modules (torch, transformers, feast, pymilvus, airflow) are imported inside the commands so that
``learn --help`` stays instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from learn_tasks.config import MODEL_KINDS, Settings, dump_json, load_settings

app = typer.Typer(help="learn: LEARN (LLM knowledge -> recommendation) as an orchestrated pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Fetch, prepare, split and describe datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def main(
    ctx: typer.Context,
    config: list[Path] = typer.Option([], "--config", "-c", help="extra YAML config file(s)"),
    set_: list[str] = typer.Option([], "--set", help="override: section.key=value (repeatable)"),
) -> None:
    ctx.obj = {"config": config, "set": set_}


def settings(ctx: typer.Context, **extra: Any) -> Settings:
    """Settings from files, env and ``--set``, plus per-command flags (``section__key=value``)."""
    obj = ctx.find_root().obj or {}
    overrides = list(obj.get("set", []))
    for key, value in extra.items():
        if value is not None:
            section, field = key.split("__", 1)
            overrides.append(f"{section}.{field}={json.dumps(value) if not isinstance(value, str) else value}")
    return load_settings(files=obj.get("config", []), overrides=overrides)


def emit(result: Any, as_json: bool) -> None:
    """Print one JSON object (machine use) or an indented summary (people)."""
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        typer.echo(dump_json(result))


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(ctx: typer.Context, name: str = typer.Argument(..., help="registered dataset name"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Get a public dataset into LEARN_HOME/raw/NAME (local mirror if configured, else download; sha256 checked)."""
    from learn_tasks.data import public, readers

    try:
        emit(public.fetch_dataset(settings(ctx), name), as_json)
    except (KeyError, readers.DataError) as exc:
        fail(str(exc))


@data_app.command("prepare")
def data_prepare(
    ctx: typer.Context,
    format: str = typer.Option(..., "--format", help="seqrec | amazon2014 | movielens | canonical"),
    input: Path = typer.Option(..., "--input", help="folder with the source files"),
    name: str = typer.Option(..., "--name", help="dataset name under LEARN_HOME/data/"),
    kcore: Optional[int] = typer.Option(None, "--kcore", help="iterative k-core filter"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Read a public format into canonical Parquet; bad rows go to quarantine with file, line and reason."""
    from learn_tasks.data import datasets, readers

    try:
        emit(datasets.prepare_dataset(settings(ctx, data__kcore=kcore), format, input, name), as_json)
    except (ValueError, readers.DataError) as exc:
        fail(str(exc))


@data_app.command("split")
def data_split(ctx: typer.Context, name: str = typer.Argument(...),
               protocol: str = typer.Option("loo", "--protocol", help="loo | temporal"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Write the split (leave-one-out or global temporal) of a prepared dataset."""
    from learn_tasks.data import splits

    try:
        emit(splits.split_dataset(settings(ctx), name, protocol), as_json)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


@data_app.command("stats")
def data_stats(ctx: typer.Context, name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Users, items, interactions, sequence lengths, time range, cold-start shares under the temporal split."""
    from learn_tasks.data import stats

    try:
        emit(stats.dataset_stats(settings(ctx), name), as_json)
    except FileNotFoundError as exc:
        fail(str(exc))


# ---------------------------------------------------------------------------------------------- encode
@app.command("encode")
def encode_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset name"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N catalogue items (by item id)"),
    model: Optional[str] = typer.Option(None, "--model", help="HF model id or local folder (default encode.model)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: encode shard i (0-based) of n disjoint shards"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Content embeddings (CEG) with a frozen LLM: only items without an up-to-date embedding are encoded."""
    import logging

    from learn_tasks.ceg import encode, encoder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        emit(encode.encode_catalogue(settings(ctx), dataset, limit=limit, shard=shard, model=model), as_json)
    except (ValueError, FileNotFoundError, encoder.EncodeError) as exc:
        fail(str(exc))


# ---------------------------------------------------------------------------------------------- model
@app.command("train")
def train_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset name"),
    protocol: str = typer.Option("loo", "--protocol", help="loo | temporal"),
    model: Optional[str] = typer.Option(None, "--model", help="learn | learn_hybrid | sasrec (default pipeline.model)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="maximum epochs (default train.epochs)"),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="wall-clock training budget in seconds"),
    warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="run folder to start from"),
    promote: bool = typer.Option(False, "--promote", help="promote the new run for serving"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train PCH towers (or SASRec) on a split; per-epoch loss, throughput and validation Recall@K go to stderr."""
    import logging

    from learn_tasks.pch import registry
    from learn_tasks.training import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    cfg = settings(ctx)
    try:
        result = train.train_model(cfg, dataset, protocol=protocol, model=model or cfg.pipeline.model, epochs=epochs,
                                   budget_s=budget_s, warm_start=warm_start)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if promote:
        registry.promote(cfg, dataset, Path(result["run_dir"]), reason="learn train --promote")
        result["promoted"] = True
    emit(result, as_json)


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset name"),
    protocol: str = typer.Option("loo", "--protocol", help="loo | temporal"),
    model: Optional[str] = typer.Option(None, "--model", help="learn | learn_hybrid | sasrec | popular | recent_popular "
                                        "| item_knn | content_knn (default pipeline.model)"),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="run folder (default: latest run of --model)"),
    stage: str = typer.Option("test", "--stage", help="test | valid"),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="evaluate a seeded sample of users"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Full-ranking Recall/HR/NDCG@K and MRR by slice, coverage; writes metrics.json and a report."""
    from learn_tasks.evaluation import harness

    cfg = settings(ctx, evaluate__max_users=max_users)
    try:
        result = harness.evaluate_run(cfg, dataset, protocol, model=model or cfg.pipeline.model, run_dir=run_dir, stage=stage)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    emit(result, as_json)


# ---------------------------------------------------------------------------------------------- serving
@app.command("features")
def features_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset name"),
    start: Optional[str] = typer.Option(None, "--start", help="window start, ISO time (default: features.window_days)"),
    end: Optional[str] = typer.Option(None, "--end", help="window end, ISO time (default: after the last event)"),
    force: bool = typer.Option(False, "--force", help="rebuild, re-apply and re-materialise even if up to date"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Feast: build the feature Parquet, apply feature_repo/, materialise the window, replay events not landed yet."""
    from learn_tasks.online import features, updates

    try:
        emit(updates.refresh_features(settings(ctx), dataset, start=start, end=end, force=force), as_json)
    except (ValueError, FileNotFoundError, features.FeaturesError) as exc:
        fail(str(exc))


index_app = typer.Typer(help="Milvus item index: build (`learn index --dataset NAME`), list, roll back, "
                        "and the local Milvus Lite server shared by processes.")
app.add_typer(index_app, name="index")
index_server_app = typer.Typer(help="The local Milvus Lite server (one process owns the data, others use its URI).",
                               no_args_is_help=True)
index_app.add_typer(index_server_app, name="server")


@index_app.callback(invoke_without_command=True)
def index_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="prepared dataset name"),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="model run folder (default: the promoted model)"),
    no_swap: bool = typer.Option(False, "--no-swap", help="build and check, but leave the alias (and the release) "
                                 "where it is"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Index every item with a model's item tower, check recall@10 against exact search, swap the alias and
    release the collection (the service follows)."""
    if ctx.invoked_subcommand is not None:
        return
    if dataset is None:
        fail("--dataset is required (or a sub-command: list, rollback, server)")
    from learn_tasks.online import index, milvus_server

    try:
        emit(index.index_catalogue(settings(ctx), dataset, run_dir=run_dir, swap=not no_swap), as_json)
    except (ValueError, FileNotFoundError, milvus_server.IndexStoreError) as exc:
        fail(str(exc))


@index_app.command("list")
def index_list(ctx: typer.Context, dataset: str = typer.Option(..., "--dataset"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """The dataset's index versions (oldest first), which one the alias points at, and the current release."""
    from learn_tasks.online import index, milvus_server, releases

    try:
        cfg = settings(ctx)
        emit({"alias": index.alias_name(cfg, dataset), "versions": index.versions(cfg, dataset),
              "release": releases.current(cfg, dataset)}, as_json)
    except milvus_server.IndexStoreError as exc:
        fail(str(exc))


@index_app.command("rollback")
def index_rollback(ctx: typer.Context, dataset: str = typer.Option(..., "--dataset"),
                   to: Optional[str] = typer.Option(None, "--to", help="version or collection (default: the previous)"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Point the alias back at an older version, in one step, and release it (the model is not promoted:
    `learn rollback` does both)."""
    from learn_tasks.online import index, milvus_server

    try:
        emit(index.rollback(settings(ctx), dataset, to=to), as_json)
    except milvus_server.IndexStoreError as exc:
        fail(str(exc))


@index_server_app.command("start")
def index_server_start(ctx: typer.Context, port: Optional[int] = typer.Option(None, "--port", help="default index.server_port"),
                       as_json: bool = typer.Option(False, "--json")) -> None:
    """Start the Milvus Lite server on 127.0.0.1 (no-op when it runs); other commands then use its URI."""
    from learn_tasks.online import milvus_server

    try:
        emit(milvus_server.start(settings(ctx), port=port), as_json)
    except milvus_server.ServerError as exc:
        fail(str(exc))


@index_server_app.command("stop")
def index_server_stop(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop the Milvus Lite server started from this LEARN_HOME."""
    from learn_tasks.online import milvus_server

    emit(milvus_server.stop(settings(ctx)), as_json)


@index_server_app.command("status")
def index_server_status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Whether the Milvus Lite server runs, with its URI."""
    from learn_tasks.online import milvus_server

    emit(milvus_server.status(settings(ctx)), as_json)


eventlog_app = typer.Typer(help="Durable event log: events, items added online, served recommendations.")
app.add_typer(eventlog_app, name="eventlog")


@eventlog_app.command("status")
def eventlog_status(ctx: typer.Context, dataset: str = typer.Option(..., "--dataset"),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Records per stream, how far the pipeline has landed them, and the last landings."""
    from learn_tasks.data import eventlog, eventlog_stores

    try:
        emit(eventlog_stores.status_report(settings(ctx), dataset), as_json)
    except eventlog.EventLogError as exc:
        fail(str(exc))


@app.command("serve")
def serve_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset (default serve.dataset or pipeline.dataset)"),
    host: Optional[str] = typer.Option(None, "--host", help="bind address (default serve.host)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (default serve.port)"),
    search: Optional[str] = typer.Option(None, "--search", help="replica | milvus (default serve.search)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="worker processes (default serve.workers)"),
    follow: bool = typer.Option(False, "--follow", help="kept for older scripts: the service always follows the "
                                "releases (it starts without one and swaps in each new one without a restart)"),
) -> None:
    """Serve the dataset's releases: GET /recommendations/{user_id}, POST /items, POST /events, /health, /metrics, /docs.

    Starts without a release too (popular items, /health "degraded: no model yet") and swaps in each new
    release (`learn_pipeline`, `learn index`, `learn rollback`) without a restart.
    """
    import logging

    from learn_tasks.online import service as serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    serve.serve_api(settings(ctx, serve__search=search, serve__workers=workers), dataset, host=host, port=port)


# ------------------------------------------------------------------------------------------ validate
@app.command("validate")
def validate_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset (its catalogue is the reference)"),
    input: Optional[Path] = typer.Option(None, "--input", help="new batch: a folder with interactions*/items* "
                                         "CSV or Parquet files, or one file; default: the prepared tables"),
    start: Optional[str] = typer.Option(None, "--start", help="earliest accepted event time (ISO); default open"),
    end: Optional[str] = typer.Option(None, "--end", help="events must be before this time (ISO); default open"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Great Expectations checks; bad rows quarantined; exit 1 when a table's failed share is over the threshold."""
    from learn_tasks.data import readers
    from learn_tasks.data import validation as validate

    try:
        emit(validate.validate_files(settings(ctx), dataset, input=input, start=start, end=end), as_json)
    except validate.ValidationFailed as exc:
        emit(exc.summary, as_json)
        fail(str(exc), code=1)
    except (FileNotFoundError, readers.DataError, ValueError) as exc:
        fail(str(exc))


# -------------------------------------------------------------------------------------------- monitor
monitor_app = typer.Typer(help="Monitoring: `learn monitor --dataset NAME` writes Evidently reports and alerts; "
                          "`learn monitor ui` serves the on-call dashboard.")
app.add_typer(monitor_app, name="monitor")


@monitor_app.callback(invoke_without_command=True)
def monitor_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="prepared dataset name"),
    start: Optional[str] = typer.Option(None, "--start", help="current window start, ISO time (default: the "
                                        "temporal split's test cut-off)"),
    end: Optional[str] = typer.Option(None, "--end", help="current window end, exclusive (default: the last event)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="name of this run; re-running it replaces it"),
    date: Optional[str] = typer.Option(None, "--date", help="report folder date YYYY-MM-DD (default today, UTC)"),
    fail_on_alert: bool = typer.Option(False, "--fail-on-alert", help="exit 1 when an alert fires"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Compare the newest window with the training window; print alerts and the report path."""
    if ctx.invoked_subcommand is not None:
        return
    if dataset is None:
        fail("--dataset is required (or the sub-command: ui)")
    from learn_tasks.data import readers
    from learn_tasks.monitoring import monitor

    try:
        result = monitor.monitor_window(settings(ctx), dataset, start, end, run_id=run_id, run_date=date)
    except (ValueError, FileNotFoundError, readers.DataError) as exc:
        fail(str(exc))
        return
    emit(result, as_json)
    if not as_json:
        for alert in result["alerts"]:
            typer.secho(f"ALERT {alert['message']}", fg=typer.colors.RED, err=True)
    if fail_on_alert and result["alerts"]:
        raise typer.Exit(1)


@monitor_app.command("ui")
def monitor_ui(
    ctx: typer.Context,
    port: Optional[int] = typer.Option(None, "--port", help="default monitor.ui_port"),
    host: Optional[str] = typer.Option(None, "--host", help="default monitor.ui_host (loopback)"),
) -> None:
    """Serve the Evidently UI over LEARN_HOME/evidently (the on-call dashboard); Ctrl-C stops it."""
    from learn_tasks.monitoring import dashboard

    cfg = settings(ctx)
    typer.echo(f"Evidently UI on http://{host or cfg.monitor.ui_host}:{port or cfg.monitor.ui_port} "
               f"(workspace {cfg.paths.evidently()})")
    dashboard.serve_ui(cfg, port=port, host=host)


# ------------------------------------------------------------------------------------------------ run
def _export_settings(ctx: typer.Context) -> None:
    """Make --config / --set visible to the pipeline's tasks, which read settings from the environment."""
    import os

    obj = ctx.find_root().obj or {}
    files = [str(Path(f).resolve()) for f in obj.get("config", [])]
    if files:
        os.environ["LEARN_CONFIG"] = ":".join([p for p in os.environ.get("LEARN_CONFIG", "").split(":") if p] + files)
    for item in obj.get("set", []):
        if "=" in item:
            dotted, value = item.split("=", 1)
            section, _, key = dotted.strip().partition(".")
            if key and "." not in key:
                os.environ[f"LEARN_{section.upper()}__{key.upper()}"] = value


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="default pipeline.dataset (the Amazon Books sample)"),
    mode: Optional[str] = typer.Option(None, "--mode", help="full | incremental (default pipeline.mode)"),
    date: Optional[str] = typer.Option(None, "--date", help="the day (UTC, YYYY-MM-DD) whose interval to run; "
                                       "default yesterday"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="training epoch limit"),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="training budget in seconds"),
    window_days: int = typer.Option(1, "--window-days", min=1, help="incremental: accept events this many days back"),
    model: Optional[str] = typer.Option(None, "--model", help="candidate kind: learn_hybrid | learn | sasrec "
                                        "(default pipeline.model); the promotion gate decides what serves"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Airflow's task logs"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the learn_pipeline DAG end to end with Airflow's own runner on the embedded stack; print a summary.

    Exit 0 only when every task succeeded. Airflow's home and SQLite DB live under LEARN_HOME/airflow.
    """
    import os

    from learn_tasks.orchestration import runner, runs, summary

    _export_settings(ctx)
    os.environ["LEARN_PROGRESS"] = "1"  # one progress line per stage on stderr
    cfg = settings(ctx)
    if mode is not None and mode not in runs.MODES:
        fail(f"--mode must be one of {runs.MODES}")
    if model is not None and model not in MODEL_KINDS:
        fail(f"--model must be one of {MODEL_KINDS}")
    try:
        result = runner.run_pipeline(cfg, dataset=dataset, mode=mode, day=date, epochs=epochs, budget_s=budget_s,
                                     window_days=window_days, verbose=verbose, model=model)
    except runs.PipelineError as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        typer.echo(summary.render_summary(result))
        for msg in result.get("failures", []):
            typer.secho(msg, fg=typer.colors.RED, err=True)
        state = "every task succeeded" if result["ok"] else f"run {result['state']}: not every task succeeded"
        typer.secho(f"learn_pipeline {result['run_id']}: {state} ({result['wall_s']} s)",
                    fg=typer.colors.GREEN if result["ok"] else typer.colors.RED)
    raise typer.Exit(0 if result["ok"] else 1)


# ------------------------------------------------------------------------------------------ rollback
@app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="prepared dataset name"),
    to: Optional[str] = typer.Option(None, "--to", help="model version (run id) to serve again; "
                                     "default: the index version before the live one"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Serve an older model again: the Milvus alias moves back to its (complete) collection in one step, that
    collection and its model run are released (the service swaps to them by itself) and the run is promoted,
    so the next pipeline run's gate compares with it."""
    from learn_tasks.online import index, milvus_server
    from learn_tasks.pch import registry

    cfg = settings(ctx)
    try:  # refuses a version whose model run is gone, before anything moves
        moved = index.rollback(cfg, dataset, to=to, source="learn rollback", require_model=True)
    except milvus_server.IndexStoreError as exc:
        fail(str(exc))
        return
    run_dir = registry.find_run(cfg, dataset, moved["version"]) or registry.dataset_models(cfg, dataset) / moved["version"]
    registry.promote(cfg, dataset, run_dir, reason=f"learn rollback from {moved['from']}")
    emit({**moved, "promoted": run_dir.name,
          "next": f"the service swaps to release {moved['release_id']} by itself (no restart)"}, as_json)


# ------------------------------------------------------------------------------------------ local stack
STACK_KEYS = ("airflow", "service", "evidently", "milvus")


@app.command("up")
def up_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset the service serves and the DAGs default "
                                          "to (default serve.dataset, else pipeline.dataset)"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated subset of milvus,airflow,service,evidently"),
    as_json: bool = typer.Option(False, "--json", help='print {"airflow", "service", "evidently", "milvus"} only'),
) -> None:
    """Start the local stack in the background on loopback (Airflow, Milvus Lite server, service, Evidently UI).

    Waits until each part is healthy, then prints the URLs and where the Airflow password is. Running it
    again while the stack runs changes nothing. Logs and pid files: LEARN_HOME/run/. Stop with `learn down`.
    """
    import os

    from learn_tasks.ops import stack

    _export_settings(ctx)
    if dataset:  # the service serves it and the DAGs' tasks default to it
        os.environ["LEARN_SERVE__DATASET"] = dataset
        os.environ["LEARN_PIPELINE__DATASET"] = dataset
    cfg = settings(ctx)
    try:
        res = stack.up(cfg, dataset=dataset, only=[c.strip() for c in only.split(",") if c.strip()] if only else None,
                       progress=lambda msg: typer.echo(f"[learn up] {msg}", err=True))
    except stack.StackError as exc:
        fail(str(exc))
        return
    note = "the stack was already running; nothing started" if res["already_running"] else "the stack is up"
    if as_json:
        typer.echo(f"[learn up] {note}", err=True)
        typer.echo(json.dumps({k: res[k] for k in STACK_KEYS}))
        return
    typer.secho(f"learn: {note} (LEARN_HOME={stack.home(cfg)}, dataset {res['dataset']})", fg=typer.colors.GREEN)
    if res["airflow"]:
        typer.echo(f"  Airflow UI    {res['airflow']}   user {res['airflow_user']}, password in "
                   f"{res['airflow_password_file']}")
    if res["service"]:
        typer.echo(f"  Explorer      {res['explorer']}   (API {res['service']}/docs; write token: {res['api_token_source']})")
        typer.echo(f"                service: {res['health'].get('service')}")
    if res["evidently"]:
        typer.echo(f"  Evidently UI  {res['evidently']}")
    if res["milvus"]:
        typer.echo(f"  Milvus        {res['milvus']}")
    typer.echo(f"Logs and pid files: {res['run_dir']}. `learn status` says what runs; `learn down` stops it.")


@app.command("status")
def status_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """What of the local stack runs, with URLs and health. Exit 0 when all of it runs, 3 otherwise."""
    from learn_tasks.ops import stack

    res = stack.status(settings(ctx))
    if as_json:
        typer.echo(json.dumps(res, default=str))
    else:
        for name, c in res["components"].items():
            mark = "up  " if c["running"] else "down"
            typer.echo(f"  {mark} {name:<10} {c['url'] or '':<28} {c['detail']}")
        if res["components"]["airflow"]["running"]:
            typer.echo(f"Airflow login: admin, password in {res['airflow_password_file']}")
    raise typer.Exit(0 if res["running"] else 3)


@app.command("down")
def down_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop exactly the processes `learn up` started (pid files under LEARN_HOME/run/)."""
    from learn_tasks.ops import stack

    try:
        res = stack.down(settings(ctx))
    except stack.StackError as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(res))
    elif res["stopped"] or res["not_running"]:
        typer.echo(f"stopped: {', '.join(res['stopped']) or 'nothing'}"
                   + (f"; already gone: {', '.join(res['not_running'])}" if res["not_running"] else ""))
    else:
        typer.echo("nothing to stop: the stack is not running")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
