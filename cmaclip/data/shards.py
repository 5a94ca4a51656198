"""The on-disk shard format shared by every data-set builder and by the training pipeline.

A data set is one folder holding Parquet shards named ``{split}-{index:05d}.parquet`` and a
``dataset.json`` that lists the tasks, their classes and the row counts. Each shard holds the
columns ``id``, ``image`` (encoded PNG or JPEG bytes), ``title``, one nullable string column
per task, and ``split``, in that order. Builders write through :class:`ShardWriter` so that a
data set of any size streams to disk with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1
DATASET_INFO_FILE = "dataset.json"
DEFAULT_ROWS_PER_SHARD = 2000
MAX_SKIPPED_ENTRIES = 200
# more skipped rows than this (as a fraction of rows read) stops a build, a training run or an
# evaluation: such data is mostly broken, and a model trained on the rest would mislead
DEFAULT_MAX_SKIPPED_FRACTION = 0.5

FIXED_COLUMNS = ("id", "image", "title", "split")

# Buffered image bytes per split before a row group is written; keeps memory bounded when the
# pictures are large photos rather than small icons.
_FLUSH_BYTES = 64 * 2**20
_SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}\.parquet$")
_INFO_KEYS = ("name", "tasks", "rows", "rows_read", "rows_skipped", "skipped", "source")


def split_for(row_id: str) -> str:
    """Assign a row to train, val or test (80/10/10) from a stable hash of its id.

    The hash comes from hashlib, not Python's salted ``hash``, so a row lands in the same split
    on every machine and every rebuild, and a row never leaks between splits when the data set
    grows.
    """
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    if bucket < 80:
        return "train"
    if bucket < 90:
        return "val"
    return "test"


def shard_schema(tasks: Sequence[str]) -> pa.Schema:
    """The explicit Arrow schema of a shard with the given task columns."""
    _check_task_names(tasks)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("title", pa.string()),
        *(pa.field(task, pa.string()) for task in tasks),
        pa.field("split", pa.string()),
    ]
    return pa.schema(fields)


class SkippedRows:
    """Counts the rows a builder leaves out and keeps the first few for ``dataset.json``.

    Every skipped row is counted, but only the first ``MAX_SKIPPED_ENTRIES`` are named, so a
    manifest with millions of missing pictures still gives a small ``dataset.json``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.entries: list[dict[str, str]] = []

    def add(self, file: str, row: str, reason: str) -> None:
        self.count += 1
        if len(self.entries) < MAX_SKIPPED_ENTRIES:
            self.entries.append({"file": file, "row": row, "reason": reason})
            logger.warning("skipped row %s (%s): %s", row, file, reason)
        else:
            logger.debug("skipped row %s (%s): %s", row, file, reason)

    def reasons(self) -> list[str]:
        """``row: reason`` for each named row, for error messages."""
        return [f"{entry['row']}: {entry['reason']}" for entry in self.entries]


class TooManySkippedError(ValueError):
    """Raised when the skipped rows pass the error budget; the message says where and why."""


def check_skipped_budget(
    read: int,
    skipped: int,
    max_fraction: float,
    *,
    where: str,
    option: str,
    reasons: Sequence[str] = (),
) -> None:
    """Stop when no row is usable, or when more than ``max_fraction`` of the rows read were skipped.

    ``option`` is the setting that raises the budget (``--max-skipped-fraction`` for a build,
    ``data.max_skipped_fraction`` for training and evaluation), so the message says what to
    change when the data is known to be this bad.
    """
    if read == 0:
        return
    fraction = skipped / read
    if skipped < read and fraction <= max_fraction:
        return

    shown = "; ".join(list(reasons)[:3])
    first = f"; first reasons: {shown}" if shown else ""
    if skipped == read:
        raise TooManySkippedError(f"{where}: all {read} rows read were skipped{first}")
    raise TooManySkippedError(
        f"{where}: {skipped} of {read} rows skipped ({fraction:.1%}), more than "
        f"{option}={max_fraction:g}{first}. Fix the data, or raise {option} to accept it"
    )


class ShardWriter:
    """Streams rows into per-split Parquet shards of at most ``rows_per_shard`` rows.

    Rows are buffered per split and written as row groups once the buffer is large, so memory
    stays bounded whatever the size of the data set. Shards are written into a staging folder
    (``out_dir/.building``) and replace the previous build's shards and ``dataset.json`` only
    when the writer closes without error: a failed rebuild leaves the old data set usable, and a
    rebuild that writes fewer shards leaves no stale ones behind.

    Example::

        with ShardWriter("data/pets", ["species"]) as writer:
            writer.add({"id": "a", "image": png_bytes, "title": "tabby", "species": "cat"})
        counts = writer.counts  # {"train": 1, "val": 0, "test": 0} or similar
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tasks: Sequence[str],
        *,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")

        self.out_dir = Path(out_dir)
        self.tasks = list(tasks)
        self.schema = shard_schema(self.tasks)
        self.rows_per_shard = rows_per_shard
        self.counts = dict.fromkeys(SPLITS, 0)
        self.files: list[str] = []

        self._columns = set(self.schema.names)
        self._buffers: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        self._buffered_bytes = dict.fromkeys(SPLITS, 0)
        self._writers: dict[str, pq.ParquetWriter | None] = dict.fromkeys(SPLITS)
        self._rows_in_file = dict.fromkeys(SPLITS, 0)
        self._file_index = dict.fromkeys(SPLITS, 0)
        self._closed = False

        self._staging = self.out_dir / ".building"
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return

        # a failed build keeps its partial shards in the staging folder for inspection, and the
        # previous build (if any) stays as it was
        for writer in self._writers.values():
            if writer is not None:
                writer.close()
        self._closed = True
        logger.warning("build failed; partial shards left in %s", self._staging)

    def add(self, row: Mapping[str, Any]) -> str:
        """Buffer one row and return its split (``row["split"]`` if given, else from the id)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")

        unknown = set(row) - self._columns
        if unknown:
            raise ValueError(
                f"row has unknown columns {sorted(unknown)}; expected {self.schema.names}"
            )
        row_id = row.get("id")
        if not isinstance(row_id, str) or not row_id:
            raise ValueError(f"row id must be a non-empty string, got {row_id!r}")

        split = row.get("split") or split_for(row_id)
        if split not in SPLITS:
            raise ValueError(f"row {row_id}: split must be one of {SPLITS}, got {split!r}")

        self._buffers[split].append({**row, "split": split})
        self._buffered_bytes[split] += len(row.get("image") or b"")
        self.counts[split] += 1

        buffered = len(self._buffers[split])
        if (
            self._rows_in_file[split] + buffered >= self.rows_per_shard
            or self._buffered_bytes[split] >= _FLUSH_BYTES
        ):
            self._flush(split)
        return split

    def close(self) -> dict[str, int]:
        """Write what is buffered, close every shard and return the row count per split."""
        if not self._closed:
            for split in SPLITS:
                self._flush(split)
                self._close_file(split)
            self._closed = True

            self._remove_previous_build()
            moved = []
            for path in map(Path, self.files):
                target = self.out_dir / path.name
                os.replace(path, target)
                moved.append(str(target))
            self.files = moved
            shutil.rmtree(self._staging, ignore_errors=True)
        return dict(self.counts)

    def _flush(self, split: str) -> None:
        rows = self._buffers[split]
        if not rows:
            return

        writer = self._writers[split]
        if writer is None:
            path = self._staging / f"{split}-{self._file_index[split]:05d}.parquet"
            # pictures are already compressed; spend no time compressing them again
            compression = {name: "zstd" for name in self.schema.names}
            compression["image"] = "none"
            writer = pq.ParquetWriter(path, self.schema, compression=compression)
            self._writers[split] = writer
            self.files.append(str(path))

        writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        self._rows_in_file[split] += len(rows)
        self._buffers[split] = []
        self._buffered_bytes[split] = 0

        if self._rows_in_file[split] >= self.rows_per_shard:
            self._close_file(split)

    def _close_file(self, split: str) -> None:
        writer = self._writers[split]
        if writer is None:
            return
        writer.close()
        self._writers[split] = None
        self._rows_in_file[split] = 0
        self._file_index[split] += 1

    def _remove_previous_build(self) -> None:
        stale = [path for path in self.out_dir.iterdir() if _SHARD_NAME.match(path.name)]
        info = self.out_dir / DATASET_INFO_FILE
        if info.exists():
            stale.append(info)
        if stale:
            logger.warning("removing %d files of a previous build in %s", len(stale), self.out_dir)
        for path in stale:
            path.unlink()


def make_dataset_info(
    *,
    name: str,
    classes: Mapping[str, Iterable[str]],
    rows: Mapping[str, int],
    rows_read: int,
    skipped: SkippedRows,
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the ``dataset.json`` content, with each task's classes sorted."""
    return {
        "name": name,
        "tasks": {task: sorted(set(values)) for task, values in classes.items()},
        "rows": {split: int(rows.get(split, 0)) for split in SPLITS},
        "rows_read": rows_read,
        "rows_skipped": skipped.count,
        "skipped": list(skipped.entries),
        "source": dict(source),
        "format_version": FORMAT_VERSION,
    }


def write_dataset_info(out_dir: str | os.PathLike[str], info: Mapping[str, Any]) -> Path:
    """Check ``info`` against the format and write it as ``dataset.json``.

    The file is written last by every builder and replaced atomically, so its presence means
    the shards beside it are complete.
    """
    path = Path(out_dir) / DATASET_INFO_FILE
    _check_info(info, where=str(path))

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_dataset_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``dataset.json`` from a data-set folder."""
    path = Path(data_dir) / DATASET_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {data_dir} is not a built data set "
            "(build one with `cmaclip data emoji` or `cmaclip data from-table`)"
        )

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error

    _check_info(info, where=str(path))
    return info


def shard_files(data_dir: str | os.PathLike[str], split: str) -> list[str]:
    """The sorted shard paths of one split of a data set."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"data set folder {directory} does not exist")

    files = sorted(
        str(path) for path in directory.glob(f"{split}-*.parquet") if _SHARD_NAME.match(path.name)
    )
    if not files:
        present = sorted(path.name for path in directory.glob("*.parquet"))
        raise FileNotFoundError(
            f"no {split} shards ({split}-NNNNN.parquet) in {directory}; "
            f"Parquet files there: {present or 'none'}"
        )
    return files


def _check_task_names(tasks: Sequence[str]) -> None:
    clashes = [task for task in tasks if task in FIXED_COLUMNS]
    if clashes:
        raise ValueError(f"task names {clashes} clash with the fixed columns {FIXED_COLUMNS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be distinct, got {list(tasks)}")
    if not tasks:
        raise ValueError("a data set needs at least one task")


def _check_info(info: Any, *, where: str) -> None:
    if not isinstance(info, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(info).__name__}")

    missing = [key for key in _INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version is {info.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    if not isinstance(info["tasks"], Mapping) or not info["tasks"]:
        raise ValueError(f"{where}: 'tasks' must map each task to its classes")
    if not isinstance(info["rows"], Mapping) or set(info["rows"]) != set(SPLITS):
        raise ValueError(f"{where}: 'rows' must give a count for each of {SPLITS}")

    rows_written = sum(info["rows"].values())
    if info["rows_read"] != rows_written + info["rows_skipped"]:
        raise ValueError(
            f"{where}: rows_read ({info['rows_read']}) != rows written ({rows_written}) "
            f"+ rows_skipped ({info['rows_skipped']})"
        )
