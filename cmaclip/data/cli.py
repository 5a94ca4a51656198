"""``cmaclip data ...``: command-line builders for the shard data sets.

The main CLI mounts :data:`data_app` under ``data``; ``python -m cmaclip.data.cli`` runs it
alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cmaclip.data.emoji import build_emoji
from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION, DEFAULT_ROWS_PER_SHARD, SPLITS
from cmaclip.data.table import build_from_table

logger = logging.getLogger(__name__)

data_app = typer.Typer(
    help="Build data sets: Parquet shards plus dataset.json.",
    no_args_is_help=True,
    add_completion=False,
)

_SHOWN_SKIPS = 5


@data_app.callback()
def _configure_logging() -> None:
    """Show build progress; a no-op when the main CLI has configured logging already."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@data_app.command("emoji")
def emoji_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards and dataset.json.")],
    vendor: Annotated[
        list[str] | None,
        typer.Option("--vendor", help="Picture vendor, repeatable [default: google, twitter]."),
    ] = None,
    sources: Annotated[
        list[Path] | None,
        typer.Option(
            "--from", help="Local package: an npm .tgz or an unpacked folder; repeatable."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Where npm tarballs are kept for reuse.")
    ] = None,
    max_rows: Annotated[
        int | None, typer.Option("--max-rows", min=1, help="Keep a deterministic subset.")
    ] = None,
    rows_per_shard: Annotated[
        int, typer.Option("--rows-per-shard", min=1)
    ] = DEFAULT_ROWS_PER_SHARD,
) -> None:
    """Build the emoji data set (category, subcategory, skin_tone) from emoji-datasource."""
    started = time.perf_counter()
    info = build_emoji(
        out,
        vendors=vendor or None,
        sources=sources or None,
        cache_dir=cache_dir,
        max_rows=max_rows,
        rows_per_shard=rows_per_shard,
    )
    _echo_summary(info, out, time.perf_counter() - started)


@data_app.command("from-table")
def from_table_command(
    manifest: Annotated[Path, typer.Argument(help="CSV, JSON-lines or Parquet manifest.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards and dataset.json.")],
    image_column: Annotated[str, typer.Option("--image-column", help="Column of picture paths.")],
    title_column: Annotated[str, typer.Option("--title-column", help="Column of titles.")],
    task: Annotated[list[str], typer.Option("--task", help="Task column, repeatable.")],
    id_column: Annotated[
        str | None, typer.Option("--id-column", help="Column of row ids [default: row number].")
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root", help="Folder picture paths are relative to [default: the manifest's]."
        ),
    ] = None,
    split_column: Annotated[
        str | None,
        typer.Option("--split-column", help="Column of train/val/test [default: hash of the id]."),
    ] = None,
    max_image_side: Annotated[
        int | None, typer.Option("--max-image-side", min=1, help="Downscale larger pictures.")
    ] = None,
    rows_per_shard: Annotated[
        int, typer.Option("--rows-per-shard", min=1)
    ] = DEFAULT_ROWS_PER_SHARD,
    max_skipped_fraction: Annotated[
        float,
        typer.Option(
            "--max-skipped-fraction",
            min=0,
            max=1,
            help="Stop the build when more of the rows read are skipped than this.",
        ),
    ] = DEFAULT_MAX_SKIPPED_FRACTION,
) -> None:
    """Build a data set from a manifest naming one picture, a title and labels per row."""
    started = time.perf_counter()
    info = build_from_table(
        manifest,
        out,
        image_column=image_column,
        title_column=title_column,
        task_columns=task,
        id_column=id_column,
        image_root=image_root,
        split_column=split_column,
        rows_per_shard=rows_per_shard,
        max_image_side=max_image_side,
        max_skipped_fraction=max_skipped_fraction,
    )
    _echo_summary(info, out, time.perf_counter() - started)


def _echo_summary(info: dict[str, Any], out: Path, seconds: float) -> None:
    """Print rows per split, skipped rows and classes per task."""
    lines = [f"{'split':<10}{'rows':>8}"]
    lines += [f"{split:<10}{info['rows'][split]:>8}" for split in SPLITS]
    lines.append(f"{'skipped':<10}{info['rows_skipped']:>8}")
    lines.append(f"{'read':<10}{info['rows_read']:>8}")
    lines += [f"task {task}: {len(classes)} classes" for task, classes in info["tasks"].items()]
    for entry in info["skipped"][:_SHOWN_SKIPS]:
        lines.append(f"skipped {entry['row']} ({entry['file']}): {entry['reason']}")
    if info["rows_skipped"] > _SHOWN_SKIPS:
        lines.append(f"... {info['rows_skipped'] - _SHOWN_SKIPS} more skipped, see dataset.json")
    lines.append(f"wrote {out} in {seconds:.1f} s")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    data_app()
