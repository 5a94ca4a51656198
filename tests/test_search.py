"""The hyperparameter search: its YAML space is checked before any trial, and a two-trial search
runs end to end through Ray Tune, Ray Train and MLflow, ranking a diverging trial as errored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cmaclip.config import ModelConfig, load_config
from cmaclip.data.shards import read_dataset_info
from cmaclip.export import save_model
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.search import _searcher, load_search_config, param_space, search
from cmaclip.tracking import tracking_uri

CONFIGS = Path(__file__).parent.parent / "configs"


def _write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _search_yaml(tmp_path: Path, space: dict, **changes) -> Path:
    content = {
        "name": "unit",
        "base": str(CONFIGS / "emoji.yaml"),
        "stage": "warmup",
        "init": str(tmp_path / "init"),
        "cache": str(tmp_path / "cache"),
        "space": space,
        **changes,
    }
    return _write(tmp_path / "search.yaml", content)


def test_the_shipped_search_config_loads_and_converts_for_optuna(monkeypatch):
    monkeypatch.setenv("CMACLIP_HOME", str(CONFIGS.parent))  # its paths are the project's
    search_config = load_search_config(CONFIGS / "search-emoji.yaml")
    space = param_space(search_config)
    assert set(space) == set(search_config.space)

    searcher = _searcher(search_config.tune)
    assert searcher.set_search_properties("score", "max", space)


@pytest.mark.parametrize(
    ("space", "changes", "message"),
    [
        ({"model.width": {"choice": [64, 96]}, "model.heads": {"choice": [4, 64]}}, {},
         "model.width 96 is not divisible by model.heads 64"),
        ({"stages.tuning.lr": {"loguniform": [1e-4, 1e-3]}}, {},
         "runs stage warmup only"),
        ({"model.layers": {"choice": [1, 2]}}, {"stage": "tuning"},
         "tuning stage reads I and T"),
        ({"model.layers": {"between": [1, 2]}}, {}, "give one of"),
        ({"stages.warmup.lr": {"uniform": [1e-3, 1e-4]}}, {}, "low < high"),
        ({"stages.warmup.lr": {"choice": [-1.0, 1e-3]}}, {}, "invalid training config"),
        ({"model.colour": {"choice": [1]}}, {}, "invalid training config"),
        ({"stages.warmup.lr": {"grid": [1e-4, 1e-3]}}, {}, "grid works with"),
    ],
)  # fmt: skip
def test_a_space_that_cannot_run_is_refused_naming_the_entry(tmp_path, space, changes, message):
    path = _search_yaml(tmp_path, space, **changes)
    with pytest.raises(ValueError, match=message):
        load_search_config(path)


@pytest.fixture(scope="module")
def finished_search(ray_cluster, emoji_shards, tmp_path_factory):
    """Two trials on emoji-mini: one learns, one's learning rate makes the loss overflow."""
    folder = tmp_path_factory.mktemp("search-test")
    info = read_dataset_info(emoji_shards)
    tasks = {task: list(classes) for task, classes in info["tasks"].items()}
    torch.manual_seed(0)
    model = CMACLIP(ModelConfig.model_validate({"layers": 1, "dropout": 0.0}), tasks)
    save_model(model, folder / "init")

    base = yaml.safe_load((CONFIGS / "emoji.yaml").read_text())
    base["data"]["path"] = str(emoji_shards)
    base["model"]["layers"] = 1
    base["stages"]["contrastive"]["enabled"] = False
    _write(folder / "base.yaml", base)
    path = _write(
        folder / "search.yaml",
        {
            "name": "two-trials",
            "base": str(folder / "base.yaml"),
            "stage": "warmup",
            "init": str(folder / "init"),
            "cache": str(folder / "cache"),  # not there yet: the search builds it
            "tune": {"algorithm": "random", "num_samples": 1, "max_concurrent": 2, "epochs": 2},
            "space": {
                "stages.warmup.lr": {"grid": [1.0e-3, 1.0e30]},
                "model.head.hidden": {"choice": [64, 128]},
            },
        },
    )
    search_config = load_search_config(path)
    return search_config, search(search_config)


@pytest.mark.slow
def test_the_search_ranks_the_trials_and_reports_the_errored_one(finished_search):
    search_config, report = finished_search
    first, second = report["trials"]

    assert first["status"] == "finished" and first["epochs"] == 2
    assert 0.0 <= first["score"] <= 1.0
    assert first["values"]["stages.warmup.lr"] == 1.0e-3
    assert second["status"] == "errored" and second["score"] is None
    assert "FloatingPointError" in second["error"] or "loss is" in second["error"]

    on_disk = json.loads((search_config.search_dir() / "ranking.json").read_text())
    assert on_disk["best"]["trial"] == first["trial"]


@pytest.mark.slow
def test_the_best_config_is_a_training_config_as_it_is(finished_search):
    search_config, report = finished_search
    best = load_config(search_config.search_dir() / "best.yaml")
    base = load_config(search_config.base)

    values = report["best"]["values"]
    assert best.stages["warmup"].lr == values["stages.warmup.lr"]
    assert best.model.head.hidden == values["model.head.hidden"]
    # the rest is the base config's: its epochs and scaling, not the trials'
    assert best.stages["warmup"].epochs == base.stages["warmup"].epochs
    assert best.scaling == base.scaling
    assert best.run.name == "two-trials-best"


@pytest.mark.slow
def test_every_trial_is_an_mlflow_run_under_the_search(finished_search):
    search_config, report = finished_search
    client = MlflowClient(tracking_uri(None))
    experiment = client.get_experiment_by_name("cmaclip")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cmaclip.search") == "two-trials"
                  and "mlflow.parentRunId" not in r.data.tags)  # fmt: skip
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_score"] == pytest.approx(report["best"]["score"])
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    finished = next(r for r in children if r.info.status == "FINISHED")
    assert finished.data.params["stages.warmup.lr"] == "0.001"
    history = client.get_metric_history(finished.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]


@pytest.mark.slow
def test_tune_results_hold_tensorboard_files_and_resume_finds_the_search(finished_search):
    search_config, report = finished_search
    tune_dir = search_config.search_dir() / "tune"
    assert list(tune_dir.glob("*/events.out.tfevents.*"))

    # a second start without --resume would overwrite it, so it is refused
    with pytest.raises(ValueError, match="pass --resume"):
        search(search_config)
    # resuming a finished search runs nothing again and ranks the same trials
    resumed = search(search_config, resume=True)
    assert [row["trial"] for row in resumed["trials"]] == [row["trial"] for row in report["trials"]]
