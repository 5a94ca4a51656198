"""Caching what a stage's frozen part computes, so that each epoch only runs what it trains.

In `warmup` the CLIP encoders are frozen, in `tuning` the sequence-wise attention too, so their
outputs are the same in every epoch. `build_cache` runs the frozen part once over every split
with Ray Data (an actor pool, one model per actor) and writes Parquet files per split:

- level `tokens` (feeds `warmup`): the image tokens [1 + P, D] and text tokens [L, D] in CLIP's
  embedding space, the text padding mask and end-of-text position;
- level `globals` (feeds `tuning`): the global embeddings I and T, [W] each;

plus per row the label ids and whether the image decoded (`valid`). Embeddings are stored as
float16. Text tokens are cut after the longest title of the data set: every position past it is
padding, which the sequence-wise attention masks out, so nothing changes but the size.

`cache.json` records which weights (a hash of the frozen part) and which data (a hash of
`dataset.json` and the shard names and sizes) the cache was built from; `check_cache` refuses a
cache whose model, data or tasks differ from the stage that wants to use it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cmaclip import __version__
from cmaclip.data.pipeline import InputSpec, Preprocessor, check_shards, raw_batches, read_columns
from cmaclip.data.shards import (
    DATASET_INFO_FILE,
    DEFAULT_MAX_SKIPPED_FRACTION,
    SPLITS,
    check_skipped_budget,
    read_dataset_info,
    shard_files,
)

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"
FORMAT_VERSION = 1

# the stage each level feeds, and the weights (state-dict prefixes) its values depend on
LEVEL_STAGE = {"tokens": "warmup", "globals": "tuning"}
STAGE_LEVEL = {stage: level for level, stage in LEVEL_STAGE.items()}
FROZEN_PARTS: dict[str, tuple[str, ...]] = {
    "tokens": ("encoders.",),
    "globals": ("encoders.", "fusion."),
}
# what a training step reads of each cached row
CACHE_COLUMNS: dict[str, list[str]] = {
    "tokens": ["image_tokens", "text_tokens", "text_padding", "eot_index", "labels", "valid"],
    "globals": ["image_embedding", "text_embedding", "labels", "valid"],
}
_FLOAT_COLUMNS = ("image_tokens", "text_tokens", "image_embedding", "text_embedding")


def _check_level(level: str) -> None:
    if level not in LEVEL_STAGE:
        raise ValueError(f"unknown cache level {level!r}; levels are {list(LEVEL_STAGE)}")


# -- fingerprints ---------------------------------------------------------------------------


def weights_fingerprint(state: Mapping[str, torch.Tensor], level: str) -> str:
    """sha256 over the names, shapes and bytes of the weights a cache level depends on."""
    _check_level(level)
    digest = hashlib.sha256(level.encode())
    names = sorted(name for name in state if name.startswith(FROZEN_PARTS[level]))
    if not names:
        raise ValueError(f"no weights under {list(FROZEN_PARTS[level])} to fingerprint")
    for name in names:
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(folder: str | Path, level: str) -> str:
    """`weights_fingerprint` of a checkpoint or model folder, read without building the model."""
    from safetensors.torch import load_file

    from cmaclip.export import WEIGHTS

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a checkpoint or model folder")
    return weights_fingerprint(load_file(str(path)), level)


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over `dataset.json` and the names and sizes of every shard.

    Shard contents are not read: a rebuilt data set gets a new `dataset.json` (its counts,
    sources or skipped rows change) or new shard sizes, and hashing gigabytes of images on
    every stage start would cost more than the cache saves.
    """
    data_dir = Path(data_dir)
    digest = hashlib.sha256((data_dir / DATASET_INFO_FILE).read_bytes())
    for split in SPLITS:
        for path in shard_files(data_dir, split):
            digest.update(f"{Path(path).name}:{os.path.getsize(path)};".encode())
    return digest.hexdigest()


def resolve_checkpoint(path: str | Path, level: str) -> Path:
    """The checkpoint a cache is built from: a checkpoint/model folder, or a run folder.

    For a run folder it is the checkpoint the cached stage starts from: the last enabled stage
    before it (`contrastive` before `warmup`, `end_to_end` before `tuning`), else `init`.
    """
    from cmaclip.config import STAGES, load_config, resolve_path
    from cmaclip.export import META

    _check_level(level)
    path = resolve_path(path)  # absolute: Ray workers run in other folders
    if (path / META).is_file():
        return path
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: neither a checkpoint/model folder ({META}) nor a run folder (config.yaml)"
        )
    config = load_config(path / "config.yaml")
    stage = LEVEL_STAGE[level]
    before = [name for name in STAGES[: STAGES.index(stage)] if config.stages[name].enabled]
    for name in [*reversed(before), "init"]:
        candidate = path / "checkpoints" / name
        if (candidate / META).is_file():
            return candidate
    raise FileNotFoundError(f"{path}/checkpoints: no checkpoint that stage {stage} starts from")


# -- building -------------------------------------------------------------------------------


class CacheEncoder:
    """Ray Data actor: preprocess a batch of shard rows and run the frozen part on it.

    Like a training run's decoding actor, it stops once more than `max_skipped_fraction` of the
    rows it has read were skipped (see `Preprocessor`).
    """

    def __init__(
        self,
        model_dir: str,
        level: str,
        text_length: int,
        threads: int = 1,
        *,
        max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
        where: str = "shards",
    ):
        from cmaclip.export import input_spec, load_model

        torch.set_num_threads(threads)
        self.model, _ = load_model(model_dir)
        self.preprocess = Preprocessor(
            input_spec(self.model), max_skipped_fraction=max_skipped_fraction, where=where
        )
        self.level = level
        self.text_length = text_length

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        inputs = self.preprocess(batch)
        with torch.no_grad():
            outputs = self.model.frozen_outputs(
                torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["text"]), self.level
            )
        if self.level == "tokens":
            outputs["text_tokens"] = outputs["text_tokens"][:, : self.text_length]
            outputs["text_padding"] = outputs["text_padding"][:, : self.text_length]

        columns = {
            name: value.to(torch.float16) if name in _FLOAT_COLUMNS else value
            for name, value in outputs.items()
        }
        return {
            "id": inputs["id"].astype(str),
            **{name: value.numpy() for name, value in columns.items()},
            "labels": inputs["labels"],
            "valid": inputs["valid"],
        }


def text_length(data_dir: str | Path, spec: InputSpec) -> int:
    """Tokens up to and including the longest title's end-of-text, over every split.

    A title that is not valid UTF-8 counts as empty: its row is skipped anyway.
    """
    import open_clip

    from cmaclip.model.encoders import register_model_configs

    register_model_configs()
    tokenizer = open_clip.get_tokenizer(spec.clip_name, context_length=spec.context_length)
    longest = 1
    for split in SPLITS:
        for batch in raw_batches(data_dir, split, spec.tasks, batch_size=4096, columns=["title"]):
            titles = [title if isinstance(title, str) else "" for title in batch["title"]]
            eot = tokenizer(titles).argmax(dim=-1)
            longest = max(longest, int(eot.max()) + 1)
    return longest


def build_cache(
    model_dir: str | Path,
    data_dir: str | Path,
    level: str,
    out: str | Path,
    *,
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
    threads: int = 1,
    batch_size: int = 64,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> dict[str, Any]:
    """Run the frozen part of `model_dir` once over every split of `data_dir` into `out`.

    The cache is written into a staging folder and moved into place at the end, so a build that
    fails leaves no half cache behind (nor removes a previous one). A split with more skipped
    rows than `max_skipped_fraction` of those read (or no usable row) stops the build, as it
    would stop training on it. Returns the manifest.
    """
    import ray
    import ray.data

    from cmaclip.export import input_spec, load_model, read_meta, swap_in

    _check_level(level)
    # absolute, since the actors run in other folders
    model_dir, data_dir, out = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(out)
    started = time.perf_counter()
    meta = read_meta(model_dir)
    tasks = meta["tasks"]
    for split in SPLITS:  # before any work, not after it
        check_shards(shard_files(data_dir, split), tasks)

    model, _ = load_model(model_dir)
    spec = input_spec(model)
    fingerprint = weights_fingerprint(model.state_dict(), level)
    length = text_length(data_dir, spec) if level == "tokens" else spec.context_length
    del model

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    staging = out.with_name(f".{out.name}-building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    logger.info("cache %s: level %s from %s over %s (text length %d)", out, level, model_dir,
                data_dir, length)  # fmt: skip

    rows: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for split in SPLITS:
        split_start = time.perf_counter()
        dataset = ray.data.read_parquet(shard_files(data_dir, split), columns=read_columns(tasks))
        dataset = dataset.map_batches(
            CacheEncoder,
            fn_constructor_kwargs={
                "model_dir": str(model_dir), "level": level, "text_length": length,
                "threads": threads, "max_skipped_fraction": max_skipped_fraction,
                "where": f"cache {out}: {data_dir} {split}",
            },
            # Arrow tables, as in training: a text value that is not UTF-8 costs its row only
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=cpus_per_actor,
        )  # fmt: skip
        dataset.write_parquet(str(staging / split), min_rows_per_file=50_000)

        valid = [
            pq.read_table(path, columns=["valid"]).column("valid").to_numpy(zero_copy_only=False)
            for path in _parquet_files(staging / split)
        ]
        rows[split] = sum(len(v) for v in valid)
        skipped[split] = int(sum((~v.astype(bool)).sum() for v in valid))
        logger.info("cache %s: %s %d rows (%d skipped) in %.0fs", out.name, split, rows[split],
                    skipped[split], time.perf_counter() - split_start)  # fmt: skip
        # the actors check their own shares once they have read enough; this is the whole split
        check_skipped_budget(
            rows[split],
            skipped[split],
            max_skipped_fraction,
            where=f"cache {out}: {data_dir} {split}",
            option="data.max_skipped_fraction",
        )

    expected = read_dataset_info(data_dir)["rows"]
    for split in SPLITS:
        if rows[split] != int(expected[split]):
            raise RuntimeError(
                f"cache {out}: {split} has {rows[split]} rows, "
                f"{data_dir / DATASET_INFO_FILE} says {expected[split]}"
            )

    size = sum(os.path.getsize(p) for split in SPLITS for p in _parquet_files(staging / split))
    total = sum(rows.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "cmaclip_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "level": level,
        "stage": LEVEL_STAGE[level],
        "model": {"path": str(model_dir.resolve()), "fingerprint": fingerprint},
        "data": {"path": str(data_dir.resolve()), "fingerprint": data_fingerprint(data_dir)},
        "tasks": tasks,
        "input": spec.to_dict(),
        "text_length": length,
        "dtype": "float16",
        "rows": rows,
        "rows_skipped": skipped,
        "bytes": size,
        "gib_per_million_rows": round(size / max(1, total) * 1e6 / 2**30, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    swap_in(staging, out)
    logger.info("cache %s: %d rows, %.1f MiB (%.2f GiB per million rows) in %.0fs", out, total,
                size / 2**20, manifest["gib_per_million_rows"], manifest["seconds"])  # fmt: skip
    return manifest


def _to_numpy(column: pa.Array) -> np.ndarray:
    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns: [N, *shape]
        return column.to_numpy()
    return column.to_numpy(zero_copy_only=False)


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


# -- using ----------------------------------------------------------------------------------


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; build the cache with `cmaclip cache --model ... --data ... "
            f"--level ... --out {cache_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in ("level", "model", "data", "tasks", "rows") if key not in manifest]
    if missing or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a cache of format {FORMAT_VERSION} written by `cmaclip cache` "
            f"(missing {missing}, format {manifest.get('format_version')!r})"
        )
    return manifest


def check_cache(
    cache_dir: str | Path,
    *,
    stage: str,
    weights: str | Path,
    data_dir: str | Path,
    tasks: Mapping[str, list[str]],
    max_skipped_fraction: float | None = None,
) -> dict[str, Any]:
    """Refuse a cache that was not built for this stage, from these weights and this data.

    Returns the manifest. Each refusal names both sides, so that the fix (rebuild the cache, or
    point the stage at the right one) is plain from the message. With `max_skipped_fraction`
    (the stage's `data.max_skipped_fraction`), a cache whose train or val split skipped more
    of its rows than that is refused too: it may have been built under a looser budget.
    """
    manifest = read_manifest(cache_dir)
    level = manifest["level"]
    where = Path(cache_dir) / MANIFEST
    if STAGE_LEVEL.get(stage) != level:
        wanted = STAGE_LEVEL.get(stage)
        raise ValueError(
            f"{where}: a {level!r} cache feeds stage {LEVEL_STAGE[level]}, not {stage}"
            + (f" (which needs a {wanted!r} cache)" if wanted else " (which takes no cache)")
        )

    model_print = checkpoint_fingerprint(weights, level)
    if manifest["model"]["fingerprint"] != model_print:
        raise ValueError(
            f"{where}: built from the model {manifest['model']['path']} "
            f"(frozen weights {manifest['model']['fingerprint'][:12]}), but stage {stage} starts "
            f"from {weights} (frozen weights {model_print[:12]}); rebuild the cache from {weights}"
        )

    data_print = data_fingerprint(data_dir)
    if manifest["data"]["fingerprint"] != data_print:
        raise ValueError(
            f"{where}: built from the data {manifest['data']['path']} "
            f"(fingerprint {manifest['data']['fingerprint'][:12]}), but stage {stage} reads "
            f"{data_dir} (fingerprint {data_print[:12]}); rebuild the cache from {data_dir}"
        )

    if dict(manifest["tasks"]) != dict(tasks):
        raise ValueError(
            f"{where}: holds labels of tasks {list(manifest['tasks'])}, but stage {stage} "
            f"trains {list(tasks)} (or their classes differ)"
        )

    if max_skipped_fraction is not None:
        for split in ("train", "val"):
            check_skipped_budget(
                int(manifest["rows"][split]),
                int(manifest.get("rows_skipped", {}).get(split, 0)),
                max_skipped_fraction,
                where=f"{where}: {split}",
                option="data.max_skipped_fraction",
            )
    return manifest


class CachedSplit:
    """One worker's share of a cached split, held in memory as tensors.

    Worker `rank` of `world` keeps rows rank, rank + world, ... of the split. With `equal`
    (training) every worker keeps the same number of rows, so that all take the same number of
    steps, as DDP needs; the at most `world - 1` rows left over sit out. Reading the rows into
    memory once, instead of streaming them through Ray Data every epoch, is what makes a cached
    epoch cost no more than the trained part's arithmetic.
    """

    def __init__(self, cache_dir: str | Path, split: str, *, rank: int = 0, world: int = 1,
                 equal: bool = True):  # fmt: skip
        import ray.data  # noqa: F401  (registers the tensor column type the cache is written in)

        manifest = read_manifest(cache_dir)
        self.columns = CACHE_COLUMNS[manifest["level"]]
        total = int(manifest["rows"][split])
        keep = total // world if equal else None

        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.columns}
        offset = 0
        for path in _parquet_files(Path(cache_dir) / split):
            table = pq.read_table(path, columns=self.columns)
            # this worker's rows of the file, by their index in the whole split
            first = (rank - offset) % world
            rows = np.arange(first, table.num_rows, world)
            offset += table.num_rows
            for name in self.columns:
                parts[name].append(_to_numpy(table.column(name).combine_chunks())[rows])
        if offset != total:
            raise ValueError(
                f"{Path(cache_dir) / split}: {offset} rows, but {MANIFEST} says {total}; "
                f"the cache is incomplete, rebuild it"
            )
        self.tensors = {
            name: torch.from_numpy(np.concatenate(chunks)[:keep]) for name, chunks in parts.items()
        }
        self.rows = len(self.tensors["valid"])

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None, drop_last: bool = False):
        """Batches as `{column: tensor}`, in a new random order per seed when one is given."""
        order = torch.arange(self.rows)
        if shuffle_seed is not None:
            order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(shuffle_seed))
        end = self.rows - self.rows % batch_size if drop_last else self.rows
        for start in range(0, end, batch_size):
            index = order[start : start + batch_size]
            yield {name: tensor[index] for name, tensor in self.tensors.items()}


def cached_inputs(batch: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's `cached=` inputs for `rows` of a cached batch, in float32.

    Text tokens are cut after the batch's longest title: the positions dropped are padding,
    masked out either way, and a shorter sequence is a cheaper attention.
    """
    if "image_embedding" in batch:
        return {
            "image_embedding": batch["image_embedding"][rows].float(),
            "text_embedding": batch["text_embedding"][rows].float(),
        }
    eot_index = batch["eot_index"][rows].long()
    length = int(eot_index.max()) + 1 if len(eot_index) else 1
    return {
        "image_tokens": batch["image_tokens"][rows].float(),
        "text_tokens": batch["text_tokens"][rows, :length].float(),
        "text_padding": batch["text_padding"][rows, :length].bool(),
        "eot_index": eot_index,
    }
