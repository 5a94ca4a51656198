"""The `cmaclip` command line: data builders, training, evaluation and prediction."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from cmaclip.data.cli import data_app

app = typer.Typer(
    help="CMA-CLIP on Ray: multi-task image-text classification.", no_args_is_help=True
)
app.add_typer(
    data_app, name="data", help="Build Parquet shards from the emoji packages or a table."
)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cmaclip").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="YAML config, e.g. configs/emoji.yaml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: key.sub=value")
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Run name (folder runs/NAME)")] = None,
) -> None:
    """Run the staged training on Ray and evaluate the test split."""
    from cmaclip.config import load_config
    from cmaclip.evaluate import format_table
    from cmaclip.training.run import train as run_training

    setup_logging()
    overrides = list(set_ or [])
    if run_name:
        overrides.append(f"run.name={run_name}")
    loaded = load_config(config, overrides)
    report = run_training(loaded)
    typer.echo(format_table(report))
    typer.echo(f"report: {loaded.run_dir() / 'report.json'}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="An exported model folder, e.g. runs/NAME/model")],
    data: Annotated[Path, typer.Option(help="A shard folder with dataset.json")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    out: Annotated[Path | None, typer.Option(help="Where to write report.json")] = None,
) -> None:
    """Score a model on a shard folder and print the per-task table."""
    from cmaclip.evaluate import evaluate as run_evaluation
    from cmaclip.evaluate import format_table

    setup_logging()
    report = run_evaluation(model, data, split, out)
    typer.echo(format_table(report))
    if out:
        typer.echo(f"report: {out}")


@app.command()
def show(report: Annotated[Path, typer.Argument(help="A report.json")]) -> None:
    """Print a report's per-task table."""
    from cmaclip.evaluate import format_table

    try:
        content = json.loads(report.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{report}: not valid JSON ({error})") from None
    if not isinstance(content, dict) or not {"tasks", "split", "rows_read"} <= content.keys():
        raise ValueError(f"{report}: not a report written by cmaclip train or evaluate")
    typer.echo(format_table(content))


@app.command()
def cache(
    model: Annotated[
        Path, typer.Option(help="A run folder (runs/NAME) or a checkpoint/model folder")
    ],
    data: Annotated[Path, typer.Option(help="A shard folder with dataset.json")],
    level: Annotated[
        str, typer.Option(help="tokens (encoder outputs, for warmup) or globals (I and T, tuning)")
    ],
    out: Annotated[Path, typer.Option(help="The cache folder to write")],
    concurrency: Annotated[int, typer.Option(help="Ray Data actors, one model each")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads per actor")] = 2,
) -> None:
    """Run a model's frozen part once over every split and store its outputs for a stage."""
    import ray

    from cmaclip.training.cache import build_cache, resolve_checkpoint

    setup_logging()
    checkpoint = resolve_checkpoint(model, level)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    manifest = build_cache(
        checkpoint, data, level, out, concurrency=concurrency, cpus_per_actor=1.0, threads=threads
    )
    rows = sum(manifest["rows"].values())
    typer.echo(
        f"cache {out}: level {level}, {rows} rows from {checkpoint}, "
        f"{manifest['bytes'] / 2**20:.1f} MiB ({manifest['gib_per_million_rows']} GiB per "
        f"million rows), {manifest['seconds']:.0f} s"
    )


@app.command()
def tune(
    config: Annotated[Path, typer.Option(help="Search config, e.g. configs/search-emoji.yaml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a search key: key.sub=value")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted search")] = False,
) -> None:
    """Search fusion hyperparameters with Ray Tune on a cached stage; write the best config."""
    from cmaclip.search import format_ranking, load_search_config
    from cmaclip.search import search as run_search

    setup_logging()
    search_config = load_search_config(config, list(set_ or []))
    report = run_search(search_config, resume=resume)
    typer.echo(format_ranking(report))
    if report["best"]:
        typer.echo(f"best config: {report['best']['config']}")
    typer.echo(f"ranking: {search_config.search_dir() / 'ranking.json'}")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user mistake (missing file, invalid value) is one line, not a traceback."""
    try:
        app(argv, standalone_mode=True)
    except (OSError, ValueError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        if error.__cause__ is not None:
            typer.echo(f"  caused by {type(error.__cause__).__name__}: {error.__cause__}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
