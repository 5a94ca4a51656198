"""The staged training run end to end through Ray Data, Ray Train (two workers) and MLflow.

Runs all four stages on the real emoji-mini renderings; a few minutes on two CPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cmaclip.config import load_config
from cmaclip.data.shards import read_dataset_info
from cmaclip.tracking import tracking_uri
from cmaclip.training.run import train

CONFIGS = Path(__file__).parent.parent / "configs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_cluster, emoji_shards):
    config = load_config(
        CONFIGS / "emoji.yaml",
        [
            f"data.path={emoji_shards}",
            "run.name=integration",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.25",
            "scaling.torch_threads=1",
            "data.preprocess_cpus=0.25",
            "model.layers=1",
            "stages.contrastive.epochs=1",
            "stages.warmup.epochs=2",
            "stages.end_to_end.epochs=2",
            "stages.tuning.epochs=1",
        ],
    )
    report = train(config)
    return config, report


def _weights(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_counts_rows_and_holds_every_metric(finished_run, emoji_shards):
    config, report = finished_run
    on_disk = json.loads((config.run_dir() / "report.json").read_text())

    assert on_disk["tasks"] == report["tasks"]
    assert report["rows_read"] == read_dataset_info(emoji_shards)["rows"]["test"]
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
    assert list(report["stages"]) == ["contrastive", "warmup", "end_to_end", "tuning"]
    for metrics in report["tasks"].values():
        for name in ("accuracy", "macro_f1", "recall_at_precision_0.9", "image_weight_mean"):
            assert 0.0 <= metrics[name] <= 1.0, name
        assert metrics["support"] > 0


def test_each_stage_starts_from_the_last_and_freezes_what_it_should(finished_run):
    config, _ = finished_run
    checkpoints = config.run_dir() / "checkpoints"
    encoders, fusion = ("encoders.",), ("fusion.",)

    # contrastive moved the encoders away from the initial weights
    assert not _same(
        _weights(checkpoints / "init", encoders), _weights(checkpoints / "contrastive", encoders)
    )
    # warmup kept them exactly; tuning kept encoders and sequence-wise attention exactly
    assert _same(
        _weights(checkpoints / "contrastive", encoders), _weights(checkpoints / "warmup", encoders)
    )
    assert not _same(
        _weights(checkpoints / "warmup", fusion), _weights(checkpoints / "end_to_end", fusion)
    )
    assert _same(
        _weights(checkpoints / "end_to_end", encoders + fusion),
        _weights(checkpoints / "tuning", encoders + fusion),
    )


def test_exported_model_carries_thresholds(finished_run):
    config, _ = finished_run
    meta = json.loads((config.run_dir() / "model" / "model.json").read_text())
    assert set(meta["tasks"]) == {"category", "subcategory", "skin_tone"}
    assert set(meta["thresholds"]["precision_0.9"]) == set(meta["tasks"])
    assert meta["stages"]["tuning"]["best_epoch"] == 1


def test_mlflow_has_every_stage_and_epoch(finished_run, emoji_shards):
    config, report = finished_run
    client = MlflowClient(tracking_uri(None))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "integration")
    children = {
        r.data.tags["cmaclip.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }

    assert parent.info.status == "FINISHED"
    assert parent.data.params["scaling.num_workers"] == "2"
    assert parent.data.metrics["test/category/accuracy"] == report["tasks"]["category"]["accuracy"]
    assert set(children) == {"contrastive", "warmup", "end_to_end", "tuning"}
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.html", "report-figures", "model"} <= artifacts

    history = client.get_metric_history(children["warmup"].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    # the loss falls over the warm-up epochs: the heads learn
    assert history[1].value < history[0].value

    # two workers, each on its own half; only the last partial batch of each is held back
    metrics = {
        name: client.get_metric_history(children["end_to_end"].info.run_id, name)[0].value
        for name in ("workers", "train_rows_used", "train_rows_skipped", "train_rows_held_back")
    }
    train_rows = read_dataset_info(emoji_shards)["rows"]["train"]
    per_worker_batch = config.stages["end_to_end"].batch_size // 2
    assert metrics["workers"] == 2
    assert metrics["train_rows_skipped"] == 0
    assert metrics["train_rows_used"] + metrics["train_rows_held_back"] == train_rows
    assert 0 <= metrics["train_rows_held_back"] < 2 * per_worker_batch + 2
