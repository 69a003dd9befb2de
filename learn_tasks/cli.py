"""The ``learn`` command: one sub-command (group) per stage, each a thin call into its module's ``run``.

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

from learn_tasks.config import Settings, dump_json, load_settings

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
    from learn_tasks import data

    try:
        emit(data.fetch(settings(ctx), name), as_json)
    except (KeyError, data.DataError) as exc:
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
    from learn_tasks import data

    try:
        emit(data.prepare(settings(ctx, data__kcore=kcore), format, input, name), as_json)
    except (ValueError, data.DataError) as exc:
        fail(str(exc))


@data_app.command("split")
def data_split(ctx: typer.Context, name: str = typer.Argument(...),
               protocol: str = typer.Option("loo", "--protocol", help="loo | temporal"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Write the split (leave-one-out or global temporal) of a prepared dataset."""
    from learn_tasks import data

    try:
        emit(data.run_split(settings(ctx), name, protocol), as_json)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


@data_app.command("stats")
def data_stats(ctx: typer.Context, name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Users, items, interactions, sequence lengths, time range, cold-start shares under the temporal split."""
    from learn_tasks import data

    try:
        emit(data.stats(settings(ctx), name), as_json)
    except FileNotFoundError as exc:
        fail(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
