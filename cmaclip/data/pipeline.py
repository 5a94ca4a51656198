"""From shards to model inputs: decoding, image transforms, tokenization and label encoding.

One `Preprocessor` serves both paths, so training and offline evaluation see identical inputs:
Ray Data runs it in `map_batches` actors for training (streaming, one tokenizer per actor), and
evaluation or prediction call it in-process on batches read with pyarrow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq

from cmaclip.data.images import ImageDecodeError, decode_image
from cmaclip.data.shards import (
    DATASET_INFO_FILE,
    DEFAULT_MAX_SKIPPED_FRACTION,
    check_skipped_budget,
    read_dataset_info,
    shard_files,
)
from cmaclip.model.encoders import register_model_configs

logger = logging.getLogger(__name__)

MISSING = -1  # label id for a missing (null) or unknown label: the row adds no loss for that task
# what a training step reads of each preprocessed row (ids and error texts stay behind)
TENSOR_COLUMNS = ["images", "text", "labels", "valid", "unknown_labels"]
BUDGET_MIN_ROWS = 256  # rows a Preprocessor reads before its error budget applies


@dataclass(frozen=True)
class InputSpec:
    """What the model expects; saved with every exported model so predictions match training."""

    clip_name: str
    image_size: int
    context_length: int
    tasks: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "clip_name": self.clip_name,
            "image_size": self.image_size,
            "context_length": self.context_length,
            "tasks": self.tasks,
        }


class Preprocessor:
    """Turns a batch of shard rows into arrays: images, text ids, labels and a validity flag.

    A row whose image does not decode, or whose text is not valid UTF-8, is kept with
    `valid=False` (a zero image, and the reason in `error`) rather than dropped, so that every
    consumer can count it: rows read = rows used + rows skipped.

    Each instance counts what it has read and stops, with `TooManySkippedError`, once it has seen
    `BUDGET_MIN_ROWS` rows and more than `max_skipped_fraction` of them were skipped: a Ray Data
    decoding actor sees only its own share of a split, and a stream has no end to wait for.
    """

    def __init__(
        self,
        spec: InputSpec | dict[str, Any],
        *,
        max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
        where: str = "shards",
    ):
        if isinstance(spec, dict):
            spec = InputSpec(**spec)
        self.spec = spec
        self.max_skipped_fraction = max_skipped_fraction
        self.where = where
        self.rows_read = 0
        self.rows_skipped = 0
        self.reasons: list[str] = []

        register_model_configs()
        self.tokenizer = open_clip.get_tokenizer(spec.clip_name, context_length=spec.context_length)
        self.transform = open_clip.image_transform(spec.image_size, is_train=False)
        self.class_index = {
            task: {name: i for i, name in enumerate(names)} for task, names in spec.tasks.items()
        }

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Preprocess a batch: an Arrow table (Ray Data, `local_batches`) or numpy columns."""
        columns, text_errors = _row_columns(batch, ["id", "title", *self.class_index])
        images_data = _column(batch, "image")
        size = len(columns["id"])
        images = np.zeros((size, 3, self.spec.image_size, self.spec.image_size), np.float32)
        valid = np.ones(size, dtype=bool)
        errors = np.full(size, "", dtype=object)

        for i, data in enumerate(images_data):
            if text_errors[i]:
                valid[i], errors[i] = False, text_errors[i]
                continue
            try:
                images[i] = self.transform(decode_image(data or b"")).numpy()
            except ImageDecodeError as error:
                valid[i], errors[i] = False, f"image: {error}"
            if not valid[i]:
                logger.debug("row %s skipped: %s", columns["id"][i], errors[i])

        titles = [title if isinstance(title, str) else "" for title in columns["title"]]
        text = self.tokenizer(titles).numpy().astype(np.int64)  # [B, context_length]

        labels = np.full((size, len(self.class_index)), MISSING, dtype=np.int64)
        unknown = np.zeros(size, dtype=np.int64)
        for k, (task, index) in enumerate(self.class_index.items()):
            for i, value in enumerate(columns[task]):
                if value is None:
                    continue
                label = index.get(value)
                if label is None:
                    unknown[i] += 1
                else:
                    labels[i, k] = label

        self._count(columns["id"], valid, errors)
        return {
            "id": np.asarray(columns["id"], dtype=object),
            "images": images,
            "text": text,
            "labels": labels,
            "valid": valid,
            "unknown_labels": unknown,
            "error": errors,
        }

    def _count(self, ids: list[Any], valid: np.ndarray, errors: np.ndarray) -> None:
        """Add a batch to this instance's counts and apply the error budget."""
        self.rows_read += len(valid)
        self.rows_skipped += int((~valid).sum())
        for i in np.flatnonzero(~valid)[: 3 - len(self.reasons)]:
            self.reasons.append(f"row {ids[i]}: {errors[i]}")
        if self.rows_read >= BUDGET_MIN_ROWS:
            check_skipped_budget(
                self.rows_read,
                self.rows_skipped,
                self.max_skipped_fraction,
                where=f"{self.where} (after {self.rows_read} rows)",
                option="data.max_skipped_fraction",
                reasons=self.reasons,
            )


def _column(batch: pa.Table | dict[str, np.ndarray], name: str) -> list[Any]:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return batch.column(name).to_pylist()
    return list(batch[name])


def _row_columns(
    batch: pa.Table | dict[str, np.ndarray], names: list[str]
) -> tuple[dict[str, list[Any]], list[str]]:
    """Text columns as Python strings, and per row why its text is unusable ("" when it is fine).

    Arrow does not check that a Parquet string column holds valid UTF-8, and converting a bad
    value to Python raises for the whole batch; reading the bytes and decoding each value keeps
    the damage to the row.
    """
    columns: dict[str, list[Any]] = {}
    errors: list[str] = []
    for name in names:
        if isinstance(batch, (pa.Table, pa.RecordBatch)):
            values = _python_values(batch.column(name))
        else:
            values = list(batch[name])
        if not errors:
            errors = [""] * len(values)

        text = []
        for i, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    if not errors[i]:
                        errors[i] = (
                            f"{name}: not valid UTF-8 ({error.reason} at byte {error.start})"
                        )
                    value = value.decode("utf-8", errors="replace")
            text.append(value)
        columns[name] = text
    return columns, errors


def read_columns(tasks: dict[str, list[str]]) -> list[str]:
    return ["id", "image", "title", *tasks]


def _column_kind_ok(kind: pa.DataType, expected: str) -> bool:
    if pa.types.is_null(kind):  # a column with no value at all, e.g. a task nobody labelled
        return expected != "binary"
    if expected == "binary":
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def check_shards(files: list[str], tasks: dict[str, list[str]]) -> None:
    """Refuse shards that lack a column or hold one of the wrong type, naming file and column.

    When the folder has a `dataset.json`, the shards of each split must also hold the rows it
    counts: a shard left over from another build, or copied in by hand, would otherwise be read
    as part of the data set without any word. Only the Parquet footers are read, so this is
    cheap enough to run before every job.
    """
    expected = {
        "id": "string",
        "image": "binary",
        "title": "string",
        **dict.fromkeys(tasks, "string"),
    }
    rows: dict[tuple[Path, str], dict[str, int]] = {}
    for path in files:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
        missing = [name for name in expected if name not in schema.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for name, kind in expected.items():
            if not _column_kind_ok(schema.field(name).type, kind):
                raise ValueError(
                    f"{path}: column {name!r} is {schema.field(name).type}, expected {kind}"
                )
        split = Path(path).name.partition("-")[0]
        rows.setdefault((Path(path).parent, split), {})[Path(path).name] = metadata.num_rows

    for (folder, split), counts in rows.items():
        if not (folder / DATASET_INFO_FILE).is_file():
            continue
        counted = read_dataset_info(folder)["rows"].get(split)
        if counted is not None and sum(counts.values()) != counted:
            raise ValueError(
                f"{folder}: the {split} shards {sorted(counts)} hold {sum(counts.values())} "
                f"rows, but {folder / DATASET_INFO_FILE} counts {counted}: a shard is missing "
                f"or comes from another build; rebuild the data set"
            )


def ray_dataset(
    data_dir: str | Path,
    split: str,
    spec: InputSpec,
    *,
    concurrency: int = 1,
    preprocess_cpus: float = 0.5,
    read_cpus: float = 0.25,
    shuffle_files: bool = False,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
    preprocess: bool = True,
):
    """A streaming Ray Dataset of preprocessed rows of one split.

    With `preprocess=False` it streams the shard rows as read (image bytes, titles, labels),
    for a consumer that runs the `Preprocessor` itself (`data.preprocess_in: worker`).

    With `shuffle_files` the shard files are read in a new order each time; the training loop
    adds a local shuffle buffer per worker, which is how rows get mixed without ever holding
    the whole split in one place.

    CPU reservations are fractional by default: on a two-core machine one training worker holds
    a whole CPU, and Ray Data must still fit its read tasks and decoding actors beside it.
    Batches reach the decoding actors as Arrow tables, so a text value that is not UTF-8 costs
    its row, not the batch.
    """
    import ray.data

    files = shard_files(data_dir, split)
    check_shards(files, spec.tasks)
    dataset = ray.data.read_parquet(
        files,
        columns=read_columns(spec.tasks),
        num_cpus=read_cpus,
        shuffle="files" if shuffle_files else None,
    )
    if not preprocess:
        return dataset
    return dataset.map_batches(
        Preprocessor,
        fn_constructor_kwargs={
            "spec": spec.to_dict(),
            "max_skipped_fraction": max_skipped_fraction,
            "where": f"{data_dir} {split}",
        },
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=preprocess_cpus,
    )


def raw_batches(
    data_dir: str | Path,
    split: str,
    tasks: dict[str, list[str]],
    *,
    batch_size: int = 64,
    columns: list[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Shard rows of one split read in this process as object arrays, one row group at a time.

    This is what `Preprocessor` takes; evaluation under noise changes titles or image bytes
    here, before they are decoded and tokenized. A text value that is not valid UTF-8 stays
    bytes, for `Preprocessor` to skip and count; each batch names its shard under `file`.
    """
    files = shard_files(data_dir, split)
    check_shards(files, tasks)
    for path in files:
        parquet = pq.ParquetFile(path)
        for record_batch in parquet.iter_batches(
            batch_size, columns=columns or read_columns(tasks)
        ):
            batch: dict[str, Any] = {
                name: np.asarray(_python_values(record_batch.column(name)), dtype=object)
                for name in record_batch.schema.names
            }
            yield {**batch, "file": path}


def _python_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column as Python values, where one bad UTF-8 string does not fail the whole column.

    A string that is not valid UTF-8 stays bytes, for `Preprocessor` to skip and name.
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.to_pylist()
    values = column.cast(pa.large_binary()).to_pylist()
    decoded = []
    for value in values:
        try:
            decoded.append(value.decode("utf-8") if value is not None else None)
        except UnicodeDecodeError:
            decoded.append(value)
    return decoded


def local_batches(
    data_dir: str | Path,
    split: str,
    spec: InputSpec,
    *,
    batch_size: int = 64,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> Iterator[dict[str, Any]]:
    """Preprocessed batches read in this process, one Parquet row group at a time.

    Each batch also names its shard under `file`, for the reports of skipped rows.
    """
    preprocess = Preprocessor(
        spec, max_skipped_fraction=max_skipped_fraction, where=f"{data_dir} {split}"
    )
    for batch in raw_batches(data_dir, split, spec.tasks, batch_size=batch_size):
        yield {**preprocess(batch), "file": batch["file"]}
