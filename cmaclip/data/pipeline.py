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
from cmaclip.data.shards import shard_files
from cmaclip.model.encoders import register_model_configs

logger = logging.getLogger(__name__)

MISSING = -1  # label id for a missing (null) or unknown label: the row adds no loss for that task
# what a training step reads of each preprocessed row (ids and error texts stay behind)
TENSOR_COLUMNS = ["images", "text", "labels", "valid", "unknown_labels"]
MAX_ASPECT = 20.0  # wider or taller images would be resized to a huge long side before cropping


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

    A row whose image does not decode is kept with `valid=False` (and a zero image) rather than
    dropped, so that every consumer can count it: rows read = rows used + rows skipped.
    """

    def __init__(self, spec: InputSpec | dict[str, Any]):
        if isinstance(spec, dict):
            spec = InputSpec(**spec)
        self.spec = spec

        register_model_configs()
        self.tokenizer = open_clip.get_tokenizer(spec.clip_name, context_length=spec.context_length)
        self.transform = open_clip.image_transform(spec.image_size, is_train=False)
        self.class_index = {
            task: {name: i for i, name in enumerate(names)} for task, names in spec.tasks.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = len(batch["id"])
        images = np.zeros((size, 3, self.spec.image_size, self.spec.image_size), np.float32)
        valid = np.ones(size, dtype=bool)
        errors = np.full(size, "", dtype=object)

        for i, data in enumerate(batch["image"]):
            try:
                image = decode_image(data)
                if max(image.size) > MAX_ASPECT * min(image.size):
                    raise ImageDecodeError(
                        f"aspect ratio of {image.size[0]}x{image.size[1]} exceeds {MAX_ASPECT:g}:1"
                    )
                images[i] = self.transform(image).numpy()
            except ImageDecodeError as error:
                valid[i] = False
                errors[i] = f"image: {error}"
                logger.debug("row %s skipped: %s", batch["id"][i], error)

        titles = [title if isinstance(title, str) else "" for title in batch["title"]]
        text = self.tokenizer(titles).numpy().astype(np.int64)  # [B, context_length]

        labels = np.full((size, len(self.class_index)), MISSING, dtype=np.int64)
        unknown = np.zeros(size, dtype=np.int64)
        for k, (task, index) in enumerate(self.class_index.items()):
            for i, value in enumerate(batch[task]):
                if value is None:
                    continue
                label = index.get(value)
                if label is None:
                    unknown[i] += 1
                else:
                    labels[i, k] = label

        return {
            "id": np.asarray(batch["id"], dtype=object),
            "images": images,
            "text": text,
            "labels": labels,
            "valid": valid,
            "unknown_labels": unknown,
            "error": errors,
        }


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

    Only the Parquet footers are read, so this is cheap enough to run before every job.
    """
    expected = {
        "id": "string",
        "image": "binary",
        "title": "string",
        **dict.fromkeys(tasks, "string"),
    }
    for path in files:
        schema = pq.read_schema(path)
        missing = [name for name in expected if name not in schema.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for name, kind in expected.items():
            if not _column_kind_ok(schema.field(name).type, kind):
                raise ValueError(
                    f"{path}: column {name!r} is {schema.field(name).type}, expected {kind}"
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
):
    """A streaming Ray Dataset of preprocessed rows of one split.

    With `shuffle_files` the shard files are read in a new order each time; the training loop
    adds a local shuffle buffer per worker, which is how rows get mixed without ever holding
    the whole split in one place.

    CPU reservations are fractional by default: on a two-core machine one training worker holds
    a whole CPU, and Ray Data must still fit its read tasks and decoding actors beside it.
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
    return dataset.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"spec": spec.to_dict()},
        batch_format="numpy",
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
    here, before they are decoded and tokenized.
    """
    files = shard_files(data_dir, split)
    check_shards(files, tasks)
    for path in files:
        parquet = pq.ParquetFile(path)
        for record_batch in parquet.iter_batches(
            batch_size, columns=columns or read_columns(tasks)
        ):
            yield {
                name: np.asarray(record_batch.column(name).to_pylist(), dtype=object)
                for name in record_batch.schema.names
            }


def local_batches(
    data_dir: str | Path, split: str, spec: InputSpec, *, batch_size: int = 64
) -> Iterator[dict[str, np.ndarray]]:
    """Preprocessed batches read in this process, one Parquet row group at a time."""
    preprocess = Preprocessor(spec)
    for batch in raw_batches(data_dir, split, spec.tasks, batch_size=batch_size):
        yield preprocess(batch)
