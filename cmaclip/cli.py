"""The `cmaclip` command line: data builders, training, evaluation and prediction."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cmaclip.data.cli import data_app
from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION

# the error budget, as `cmaclip evaluate` and `cmaclip cache` take it
MaxSkippedFraction = Annotated[
    float, typer.Option(min=0, max=1, help="Stop when more of the rows read are skipped than this")
]

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
    restart: Annotated[
        bool, typer.Option(help="Delete an earlier submission of the run and train it anew")
    ] = False,
) -> None:
    """Run the staged training on Ray and evaluate the test split.

    Submitting a run name again resumes it: finished stages are kept, an unfinished stage goes
    on from its latest checkpoint, a finished run does nothing.
    """
    from cmaclip.config import load_config
    from cmaclip.evaluate import format_table
    from cmaclip.training.run import train as run_training

    setup_logging()
    overrides = list(set_ or [])
    if run_name:
        overrides.append(f"run.name={run_name}")
    loaded = load_config(config, overrides)
    report = run_training(loaded, restart=restart)
    submission = report.get("submission", {})
    if submission.get("already_finished"):
        typer.echo(
            f"run {loaded.run.name} had finished already ({report.get('finished', 'unknown')}): "
            f"nothing trained; --restart trains it anew"
        )
    elif submission.get("kept"):
        typer.echo(f"resumed: stage(s) {', '.join(submission['kept'])} kept from before")
    typer.echo(format_table(report))
    typer.echo(f"report: {loaded.run_dir() / 'report.json'}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="An exported model folder, e.g. runs/NAME/model")],
    data: Annotated[Path, typer.Option(help="A shard folder with dataset.json")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write report.json; figures and report.html go beside it"),
    ] = None,
    noise: Annotated[
        list[str] | None,
        typer.Option(
            help="Also score with a fraction of rows corrupted, KIND:RATE[:PARAM]; repeatable. "
            "Kinds: title_swap, title_empty, title_extra (PARAM words, 3), image_swap, "
            "image_blank, image_gaussian (PARAM sigma in [0, 1] pixel units, 0.25)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Which rows noise corrupts, and how")] = 0,
    max_skipped_fraction: MaxSkippedFraction = DEFAULT_MAX_SKIPPED_FRACTION,
) -> None:
    """Score a model on a shard folder and print the per-task table (and one per noise)."""
    from cmaclip.evaluate import evaluate as run_evaluation
    from cmaclip.evaluate import format_table
    from cmaclip.noise import parse_noise

    setup_logging()
    settings = [parse_noise(item) for item in noise or []]
    report = run_evaluation(
        model, data, split, out, noise=settings, seed=seed,
        max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
    typer.echo(format_table(report))
    if out:
        typer.echo(f"report: {out} (and {out.with_suffix('.html')})")


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


def _read_items(source: Path) -> list[tuple[str | None, bytes | None]]:
    """Items from a JSON-lines file: {"title": ..., "image": path relative to the file}."""
    items = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{number}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not {"title", "image"} & row.keys():
            raise ValueError(f'{source}:{number}: expected an object with "title" and/or "image"')
        image = row.get("image")
        items.append((row.get("title"), (source.parent / image).read_bytes() if image else None))
    return items


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Model folder (runs/NAME/model) or runs:/ID/model")],
    image: Annotated[Path | None, typer.Option(help="An image file")] = None,
    title: Annotated[str | None, typer.Option(help="The item's title")] = None,
    input_: Annotated[
        Path | None,
        typer.Option("--input", help='JSON lines of {"title": ..., "image": "file.png"}'),
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks; default all")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels listed per task")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per forward pass")] = 64,
) -> None:
    """Classify items offline, with the whole model in this process; prints JSON lines.

    The answers are those the HTTP service gives for the same inputs.
    """
    from cmaclip.predict import Predictor, to_json

    setup_logging()
    if input_ is not None:
        if image is not None or title is not None:
            raise ValueError("give --input, or --image and/or --title, not both")
        items = _read_items(input_)
    elif image is None and title is None:
        raise ValueError("give --image and/or --title, or --input with a JSON-lines file")
    else:
        items = [(title, image.read_bytes() if image else None)]

    predictor = Predictor(model)
    wanted = [task.strip() for task in tasks.split(",")] if tasks else None
    for start in range(0, len(items), batch_size):
        answers = predictor.predict(items[start : start + batch_size], tasks=wanted, top_k=top_k)
        typer.echo(to_json(answers))


@app.command()
def explain(
    model: Annotated[str, typer.Option(help="Model folder (runs/NAME/model) or runs:/ID/model")],
    image: Annotated[Path, typer.Option(help="An image file")],
    title: Annotated[str, typer.Option(help="The item's title")],
    out: Annotated[Path, typer.Option(help="The PNG to write")],
    token: Annotated[
        str | None,
        typer.Option(help="The word of the title to show; default: the one most on the image"),
    ] = None,
    layer: Annotated[int, typer.Option(help="Sequence-wise layer, a Python index")] = -1,
) -> None:
    """Draw where a word of the title attends in the image, with each task's answer and λ_I."""
    from cmaclip.explain import explain as run_explain
    from cmaclip.explain import write_explanation

    setup_logging()
    explanation = run_explain(model, image.read_bytes(), title, token=token, layer=layer)
    write_explanation(explanation, out)
    summary = {
        "word": explanation.word.text,
        "layer": explanation.layer,
        "image_share": round(explanation.image_share, 4),
        "tasks": {
            task: {key: answer[key] for key in ("label", "probability", "image_weight")}
            for task, answer in explanation.answer["tasks"].items()
        },
    }
    typer.echo(json.dumps(summary))
    typer.echo(f"figure: {out}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model folder (runs/NAME/model) or runs:/ID/model")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Largest encoder batch")] = 32,
) -> None:
    """Serve a model over HTTP with Ray Serve until interrupted (serve/config.yaml for more)."""
    import ray
    from ray import serve as ray_serve

    from cmaclip.serving import run_local, serve_environment

    setup_logging()
    if not ray.is_initialized():
        # HAProxy in front of the ingress when this starts the cluster; a cluster started by
        # `ray start` (make ray-up) has the variables of its own environment
        os.environ.update(serve_environment())
        ray.init(log_to_driver=False)
    url = run_local({"model": model, "max_batch_size": max_batch_size}, host=host, port=port)
    typer.echo(f"serving {model} at {url} (OpenAPI docs at {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()


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
    max_skipped_fraction: MaxSkippedFraction = DEFAULT_MAX_SKIPPED_FRACTION,
) -> None:
    """Run a model's frozen part once over every split and store its outputs for a stage."""
    import ray

    from cmaclip.training.cache import build_cache, resolve_checkpoint

    setup_logging()
    checkpoint = resolve_checkpoint(model, level)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    manifest = build_cache(
        checkpoint, data, level, out, concurrency=concurrency, cpus_per_actor=1.0, threads=threads,
        max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip
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


experiment_app = typer.Typer(
    help="The paper's comparisons on your data: ablation table, noise robustness.",
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("ablation")
def experiment_ablation(
    config: Annotated[Path, typer.Option(help="Training config, e.g. configs/emoji.yaml")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key for every variant: key.sub=value"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Folder under run.root; default <run.name>-ablation")
    ] = None,
    contrastive: Annotated[
        Path | None,
        typer.Option(help="A contrastive checkpoint every variant starts from (else trained once)"),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this variant; repeatable")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Keep the variants already finished")] = False,
    template: Annotated[
        str | None, typer.Option(help='Zero-shot prompt, default "a photo of a {class}"')
    ] = None,
    probe_c: Annotated[float, typer.Option(help="Linear probe inverse regularisation")] = 1.0,
) -> None:
    """Train and evaluate CLIP baselines and CMA-CLIP ablations on the same splits."""
    from cmaclip.config import load_config
    from cmaclip.experiments import ablation, ablation_dir, format_ablation

    setup_logging()
    loaded = load_config(config, list(set_ or []))
    state = ablation(loaded, name=name, contrastive=contrastive, only=only, resume=resume,
                     template=template, probe_c=probe_c)  # fmt: skip
    typer.echo(format_ablation(state))
    typer.echo(f"table: {ablation_dir(loaded, name) / 'ablation.md'}")


@experiment_app.command("noise")
def experiment_noise(
    ablation: Annotated[Path, typer.Option(help="An ablation folder (with ablation.json)")],
    kind: Annotated[
        list[str] | None,
        typer.Option(help="Noise kind; repeatable (default title_swap, image_swap)"),
    ] = None,
    rate: Annotated[
        list[float] | None, typer.Option(help="Noise rate; repeatable (default 0 .. 1 by 0.25)")
    ] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Only this variant; repeatable")] = None,
    seed: Annotated[int, typer.Option(help="Which rows are corrupted, and how")] = 0,
) -> None:
    """Accuracy of the ablation's variants against the share of corrupted test rows."""
    from cmaclip.config import resolve_path
    from cmaclip.experiments import format_noise, noise_grid

    setup_logging()
    root = resolve_path(ablation)
    results = noise_grid(
        root, kinds=kind or ["title_swap", "image_swap"],
        rates=sorted(rate) if rate else [0.0, 0.25, 0.5, 0.75, 1.0], seed=seed, variants=variant,
    )  # fmt: skip
    typer.echo(format_noise(results))
    typer.echo(f"figure: {root / 'noise.png'}")


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
