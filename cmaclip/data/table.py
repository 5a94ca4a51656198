"""Build a data set from a manifest table: one row per picture, with a title and task labels.

This is the way in for your own data: a CSV, JSON-lines or Parquet file naming, per row, a
picture file, a title and one column per task. The manifest is read in batches and pictures are
decoded as they are written, so the build needs memory for one batch, not for the data set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from PIL import Image

from cmaclip.data.images import ImageDecodeError, decode_image, encode_png
from cmaclip.data.shards import (
    DEFAULT_MAX_SKIPPED_FRACTION,
    DEFAULT_ROWS_PER_SHARD,
    SPLITS,
    ShardWriter,
    SkippedRows,
    check_skipped_budget,
    make_dataset_info,
    write_dataset_info,
)

logger = logging.getLogger(__name__)

MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_BATCH_ROWS = 1024
_LOG_EVERY = 5000
# the shard format stores PNG or JPEG bytes; pictures in other formats are re-encoded as PNG
_STORED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
# decoding releases the GIL, so a few threads keep a large build from being CPU-bound on one core
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Picture:
    """The outcome of loading one row's picture: bytes to store, or why the row is skipped."""

    data: bytes | None
    path: str
    reason: str | None = None


def build_from_table(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_column: str,
    title_column: str,
    task_columns: Sequence[str],
    id_column: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    split_column: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    max_image_side: int | None = None,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> dict[str, Any]:
    """Build shards from a manifest table and return the ``dataset.json`` content.

    Args:
        manifest: a ``.csv``, ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file.
        out_dir: folder for the shards and ``dataset.json``; earlier shards there are replaced.
        image_column: column with picture paths, relative to ``image_root`` unless absolute.
        title_column: column with the text of each row; a missing title is stored as ``""``.
        task_columns: one column per task; each task's classes are its distinct non-null
            values, and a null value is a missing label.
        id_column: column with row ids; default the row number in the manifest.
        image_root: folder the picture paths are relative to; default the manifest's folder.
        split_column: column with ``train``/``val``/``test`` per row; default a stable hash
            of the id (80/10/10).
        rows_per_shard: most rows in one Parquet file.
        max_image_side: downscale larger pictures so their longer side is this many pixels
            (stored as PNG); by default the original PNG or JPEG bytes are stored unchanged,
            and pictures in other formats are stored as PNG.
        max_skipped_fraction: the error budget; more skipped rows than this fraction of the
            rows read (or no usable row at all) stops the build, and the previous data set in
            ``out_dir``, if any, stays as it was.

    Rows whose picture is missing or cannot be decoded, rows with text that is not valid UTF-8,
    and rows that repeat the id of a row already written are left out and counted in
    ``rows_skipped``.

    Example:
        >>> build_from_table(
        ...     "products.csv", "data/products", image_column="path", title_column="title",
        ...     task_columns=["color", "material"],
        ... )["rows"]
        {'train': ..., 'val': ..., 'test': ...}
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if not task_columns:
        raise ValueError("task_columns is empty: name at least one task column")
    if max_image_side is not None and max_image_side < 1:
        raise ValueError(f"max_image_side must be at least 1, got {max_image_side}")
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
    root = Path(image_root) if image_root is not None else manifest.parent
    started = time.perf_counter()

    columns = [image_column, title_column, *task_columns]
    columns += [column for column in (id_column, split_column) if column is not None]
    columns = list(dict.fromkeys(columns))
    batches = _read_batches(manifest, columns)

    skipped = SkippedRows()
    classes: dict[str, set[str]] = {task: set() for task in task_columns}
    written_ids: set[str] = set()
    rows_read = 0

    with (
        ShardWriter(out_dir, task_columns, rows_per_shard=rows_per_shard) as writer,
        ThreadPoolExecutor(_DECODE_THREADS) as pool,
    ):
        for batch in batches:
            records = [_decoded(record) for record in batch.to_pylist()]
            paths = [record.get(image_column) for record in records]
            pictures = pool.map(lambda path: _load_picture(path, root, max_image_side), paths)

            for record, picture in zip(records, pictures, strict=True):
                rows_read += 1
                # messages count manifest rows from 1 (the header not counted); a default id
                # stays the 0-based row number, so existing data sets keep their splits
                where = f"manifest row {rows_read}"
                row_id = str(rows_read - 1) if id_column is None else record.get(id_column)
                name = row_id or where

                if "_utf8" in record:
                    skipped.add(picture.path, name, record["_utf8"])
                    continue
                if not row_id:
                    skipped.add(picture.path, where, "empty id")
                    continue
                # a duplicate is a repeat of a row already written: when the first copy was
                # skipped for its picture, a later copy with a good picture is kept
                if row_id in written_ids:
                    skipped.add(picture.path, row_id, f"duplicate id ({where})")
                    continue
                if picture.data is None:
                    skipped.add(picture.path, row_id, picture.reason or "unreadable image")
                    continue

                row = {
                    "id": row_id,
                    "image": picture.data,
                    "title": record[title_column] or "",
                    **{task: record[task] for task in task_columns},
                }
                if split_column is not None:
                    row["split"] = _checked_split(
                        record[split_column], f"{manifest}: {where} (id {row_id!r})", split_column
                    )
                writer.add(row)
                written_ids.add(row_id)
                for task in task_columns:
                    if record[task] is not None:
                        classes[task].add(record[task])

                if rows_read % _LOG_EVERY == 0:
                    logger.info(
                        "%s: %d rows read, %d skipped", manifest.name, rows_read, skipped.count
                    )

        # inside the writer's block: a refused build leaves the previous data set in place
        check_skipped_budget(
            rows_read,
            skipped.count,
            max_skipped_fraction,
            where=f"building {out_dir} from {manifest}",
            option="--max-skipped-fraction",
            reasons=skipped.reasons(),
        )

    info = make_dataset_info(
        name=manifest.stem,
        classes=classes,
        rows=writer.counts,
        rows_read=rows_read,
        skipped=skipped,
        source={
            "kind": "table",
            "manifest": str(manifest),
            "format": MANIFEST_FORMATS[manifest.suffix.lower()],
            "image_root": str(root),
            "image_column": image_column,
            "title_column": title_column,
            "id_column": id_column,
            "split_column": split_column,
            "max_image_side": max_image_side,
        },
    )
    write_dataset_info(out_dir, info)
    logger.info(
        "%s: wrote %s rows (%d skipped) to %s in %.1f s",
        manifest.name,
        info["rows"],
        skipped.count,
        out_dir,
        time.perf_counter() - started,
    )
    return info


def _read_batches(manifest: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Check the columns exist, then stream the manifest as batches of string columns."""
    kind = MANIFEST_FORMATS.get(manifest.suffix.lower())
    if kind is None:
        raise ValueError(
            f"manifest {manifest} has an unsupported extension; use one of "
            f"{sorted(MANIFEST_FORMATS)}"
        )

    try:
        if kind == "csv":
            present = pa_csv.open_csv(manifest).schema.names
            _check_columns(manifest, columns, present)
            convert = pa_csv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.binary()),
                include_columns=columns,
                strings_can_be_null=True,
                null_values=[""],
            )
            reader = pa_csv.open_csv(manifest, convert_options=convert)
        elif kind == "json":
            reader = pa_json.open_json(manifest)
            _check_columns(manifest, columns, reader.schema.names)
        else:
            parquet = pq.ParquetFile(manifest)
            _check_columns(manifest, columns, parquet.schema_arrow.names)
            reader = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
    except pa.ArrowInvalid as error:
        raise ValueError(f"cannot read manifest {manifest} as {kind}: {error}") from error

    return _as_strings(manifest, kind, reader, columns)


def _as_strings(
    manifest: Path, kind: str, reader: Any, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    """Yield batches of at most ``_BATCH_ROWS`` rows with every needed column as UTF-8 bytes.

    Ids and labels may be stored as numbers; casting keeps ``7`` and ``"7"`` the same class.
    The text stays bytes here, because Arrow does not check that string columns read from CSV,
    JSON or Parquet are valid UTF-8: :func:`_decoded` decodes each row and names what is wrong.
    """
    try:
        for batch in reader:
            arrays = [_as_bytes(batch.column(column)) for column in columns]
            table_batch = pa.RecordBatch.from_arrays(arrays, names=columns)
            for offset in range(0, table_batch.num_rows, _BATCH_ROWS):
                yield table_batch.slice(offset, _BATCH_ROWS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        hint = (
            " (JSON lines need one object per line with consistent types)" if kind == "json" else ""
        )
        raise ValueError(f"cannot read manifest {manifest} as {kind}{hint}: {error}") from error


def _as_bytes(column: pa.Array) -> pa.Array:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column
    return pc.cast(pc.cast(column, pa.string()), pa.binary())


def _decoded(record: dict[str, bytes | None]) -> dict[str, Any]:
    """A manifest row as text; a value that is not UTF-8 sets ``_utf8`` to the reason."""
    decoded: dict[str, Any] = {}
    for column, value in record.items():
        if value is None:
            decoded[column] = None
            continue
        try:
            decoded[column] = value.decode("utf-8")
        except UnicodeDecodeError as error:
            decoded[column] = value.decode("utf-8", errors="replace")
            decoded.setdefault(
                "_utf8",
                f"column {column!r} is not valid UTF-8 ({error.reason} at byte {error.start})",
            )
    return decoded


def _check_columns(manifest: Path, wanted: list[str], present: Sequence[str]) -> None:
    missing = [column for column in wanted if column not in present]
    if missing:
        raise ValueError(
            f"manifest {manifest} has no column(s) {missing}; its columns are {list(present)}"
        )


def _checked_split(value: str | None, where: str, split_column: str) -> str:
    if value not in SPLITS:
        raise ValueError(
            f"{where}: column {split_column!r} holds {value!r}; "
            f"split values must be one of {SPLITS}"
        )
    return value


def _load_picture(path_value: str | None, root: Path, max_image_side: int | None) -> _Picture:
    """Read and validate one picture, downscaling or re-encoding it when needed."""
    if not path_value:
        return _Picture(None, "", "no image path")
    path = Path(path_value)
    if not path.is_absolute():
        path = root / path

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Picture(None, str(path), "image file missing")
    except OSError as error:
        return _Picture(None, str(path), f"cannot read image file: {error}")

    try:
        picture = decode_image(data)
    except ImageDecodeError as error:
        return _Picture(None, str(path), str(error))

    if max_image_side is not None and max(picture.size) > max_image_side:
        picture.thumbnail((max_image_side, max_image_side), Image.Resampling.LANCZOS)
        return _Picture(encode_png(picture), str(path))
    if not data.startswith(_STORED_SIGNATURES):
        return _Picture(encode_png(picture), str(path))
    return _Picture(data, str(path))
