"""The frozen-part cache: cached inputs give the uncached outputs, values and labels survive the
round trip through Ray Data and Parquet, and a cache of other weights or data is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cmaclip.config import ModelConfig
from cmaclip.data.pipeline import local_batches
from cmaclip.data.shards import TooManySkippedError, read_dataset_info
from cmaclip.export import input_spec, load_model, save_model
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.training.cache import (
    CachedSplit,
    build_cache,
    cached_inputs,
    check_cache,
    data_fingerprint,
    read_manifest,
)
from cmaclip.training.losses import multitask_loss

TASKS = {"color": ["red", "green", "blue"], "pattern": ["plain", "striped"]}


def _model(config: ModelConfig, tasks, seed: int = 0) -> CMACLIP:
    torch.manual_seed(seed)
    return CMACLIP(config, tasks).eval()


def _batch(model: CMACLIP):
    import open_clip

    tokenizer = open_clip.get_tokenizer("cmaclip-tiny")
    titles = ["red striped shirt", "green plain cap", "blue", "a very long title " * 3]
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64), tokenizer(titles)


@pytest.mark.parametrize("sequence_attention", [True, False])
def test_cached_tokens_give_the_uncached_output(tiny_model_config, sequence_attention):
    config = tiny_model_config.model_copy(update={"sequence_attention": sequence_attention})
    model = _model(config, TASKS)
    images, text = _batch(model)

    with torch.no_grad():
        direct = model(images, text)
        tokens = model.frozen_outputs(images, text, "tokens")
        # as a training step sees them: cut after the batch's longest title
        rows = torch.ones(4, dtype=torch.bool)
        cached = model(cached=cached_inputs(tokens, rows))
        globals_ = model(cached=model.frozen_outputs(images, text, "globals"))

    assert cached_inputs(tokens, rows)["text_tokens"].shape[1] < text.shape[1]
    for task in TASKS:
        torch.testing.assert_close(cached.logits[task], direct.logits[task], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(globals_.logits[task], direct.logits[task])
    torch.testing.assert_close(cached.image_weight, direct.image_weight, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def built_cache(ray_cluster, emoji_shards, tmp_path_factory):
    """A tokens cache of emoji-mini, built through Ray Data from a freshly initialised model."""
    info = read_dataset_info(emoji_shards)
    tasks = {task: list(classes) for task, classes in info["tasks"].items()}
    config = ModelConfig.model_validate({"layers": 1, "dropout": 0.0})
    folder = tmp_path_factory.mktemp("cache-test")
    model_dir = save_model(_model(config, tasks), folder / "init")
    manifest = build_cache(model_dir, emoji_shards, "tokens", folder / "cache", threads=1)
    return model_dir, folder / "cache", manifest, tasks


@pytest.mark.slow
def test_values_and_labels_survive_the_round_trip(built_cache, emoji_shards):
    model_dir, cache_dir, manifest, tasks = built_cache
    info = read_dataset_info(emoji_shards)
    assert manifest["rows"] == {split: int(info["rows"][split]) for split in manifest["rows"]}
    assert json.loads((cache_dir / "cache.json").read_text())["level"] == "tokens"
    assert manifest["bytes"] > 0 and manifest["gib_per_million_rows"] > 0

    # the cached rows of the validation split, by id, against the model run here and now
    model, _ = load_model(model_dir)
    spec = input_spec(model)
    table = pq.read_table(next((cache_dir / "val").glob("*.parquet")))
    cached = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    image_tokens = table.column("image_tokens").combine_chunks().to_numpy()
    labels = table.column("labels").combine_chunks().to_numpy()

    seen = 0
    for batch in local_batches(emoji_shards, "val", spec, batch_size=32):
        with torch.no_grad():
            fresh = model.frozen_outputs(
                torch.from_numpy(batch["images"]), torch.from_numpy(batch["text"]), "tokens"
            )
        for i, row_id in enumerate(batch["id"]):
            row = cached[row_id]
            np.testing.assert_array_equal(labels[row], batch["labels"][i])
            np.testing.assert_allclose(
                image_tokens[row].astype(np.float32), fresh["image_tokens"][i].numpy(),
                rtol=2e-3, atol=2e-3,
            )  # fmt: skip
            seen += 1
    assert seen == len(cached) == manifest["rows"]["val"]


@pytest.mark.slow
def test_cached_validation_loss_matches_the_uncached_one(built_cache, emoji_shards):
    """Same rows, same labels, same metric: the loss over the split agrees to float16 noise."""
    model_dir, cache_dir, _, _ = built_cache
    model, _ = load_model(model_dir)
    spec = input_spec(model)

    def mean_loss(outputs_and_labels):
        losses = [
            float(multitask_loss(out.logits, labels)[0]) for out, labels in outputs_and_labels
        ]
        return sum(losses) / len(losses), len(losses)

    with torch.no_grad():
        uncached = mean_loss(
            (model(torch.from_numpy(b["images"]), torch.from_numpy(b["text"])),
             torch.from_numpy(b["labels"]))
            for b in local_batches(emoji_shards, "val", spec, batch_size=1)
        )  # fmt: skip
        split = CachedSplit(cache_dir, "val", equal=False)
        cached = mean_loss(
            (model(cached=cached_inputs(b, b["valid"].bool())), b["labels"])
            for b in split.batches(1)
        )
    assert uncached[1] == cached[1] == split.rows
    assert cached[0] == pytest.approx(uncached[0], rel=1e-3)


@pytest.mark.slow
def test_workers_get_equal_disjoint_shares(built_cache):
    _, cache_dir, manifest, _ = built_cache
    shares = [CachedSplit(cache_dir, "train", rank=r, world=3) for r in range(3)]
    assert len({share.rows for share in shares}) == 1
    assert 0 <= manifest["rows"]["train"] - 3 * shares[0].rows < 3

    everything = CachedSplit(cache_dir, "train")
    first_rows = [share.tensors["image_tokens"][0] for share in shares]
    for rank, row in enumerate(first_rows):
        assert torch.equal(row, everything.tensors["image_tokens"][rank])


@pytest.mark.slow
def test_a_cache_of_other_weights_or_data_is_refused(built_cache, emoji_shards, tmp_path):
    model_dir, cache_dir, _, tasks = built_cache
    check_cache(cache_dir, stage="warmup", weights=model_dir, data_dir=emoji_shards, tasks=tasks)

    # other encoder weights
    config = ModelConfig.model_validate({"layers": 1, "dropout": 0.0})
    other = save_model(_model(config, tasks, seed=1), tmp_path / "other")
    with pytest.raises(ValueError, match="built from the model .*init.* but stage warmup starts "
                       "from .*other"):  # fmt: skip
        check_cache(cache_dir, stage="warmup", weights=other, data_dir=emoji_shards, tasks=tasks)

    # the same encoders with other fusion weights still fit a tokens cache
    moved = _model(config, tasks, seed=2)
    moved.encoders.load_state_dict(load_model(model_dir)[0].encoders.state_dict())
    same_encoders = save_model(moved, tmp_path / "same-encoders")
    check_cache(
        cache_dir, stage="warmup", weights=same_encoders, data_dir=emoji_shards, tasks=tasks
    )

    # other data: a rebuilt data set has another dataset.json
    data = tmp_path / "data"
    shutil.copytree(emoji_shards, data)
    info = json.loads((data / "dataset.json").read_text())
    info["name"] = "emoji-changed"
    (data / "dataset.json").write_text(json.dumps(info))
    assert data_fingerprint(data) != read_manifest(cache_dir)["data"]["fingerprint"]
    with pytest.raises(ValueError, match="built from the data .* but stage warmup reads"):
        check_cache(cache_dir, stage="warmup", weights=model_dir, data_dir=data, tasks=tasks)

    # another stage, other tasks
    with pytest.raises(ValueError, match="a 'tokens' cache feeds stage warmup, not tuning"):
        check_cache(cache_dir, stage="tuning", weights=model_dir, data_dir=emoji_shards,
                    tasks=tasks)  # fmt: skip
    fewer = {task: classes for task, classes in tasks.items() if task != "skin_tone"}
    with pytest.raises(ValueError, match="holds labels of tasks"):
        check_cache(cache_dir, stage="warmup", weights=model_dir, data_dir=emoji_shards,
                    tasks=fewer)  # fmt: skip

    # a cache built under a looser error budget than the stage's
    loose = tmp_path / "loose"
    shutil.copytree(cache_dir, loose)
    manifest = read_manifest(loose)
    manifest["rows_skipped"]["val"] = manifest["rows"]["val"] // 2 + 1
    (loose / "cache.json").write_text(json.dumps(manifest))
    check_cache(loose, stage="warmup", weights=model_dir, data_dir=emoji_shards, tasks=tasks)
    with pytest.raises(TooManySkippedError, match=r"cache\.json: val: .* rows skipped .*more "
                       r"than data\.max_skipped_fraction=0\.5"):  # fmt: skip
        check_cache(loose, stage="warmup", weights=model_dir, data_dir=emoji_shards, tasks=tasks,
                    max_skipped_fraction=0.5)  # fmt: skip


def test_a_folder_without_a_manifest_is_no_cache(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="cmaclip cache"):
        read_manifest(tmp_path)
