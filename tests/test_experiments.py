"""`cmaclip experiment ablation` and `noise` on emoji-mini, through Ray Train and MLflow.

A shortened schedule (one contrastive and one warm-up epoch) and three of the seven variants
plus the baselines keep it to about a minute on two CPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from cmaclip.config import load_config
from cmaclip.experiments import VARIANTS, ablation, format_ablation, noise_grid
from cmaclip.tracking import tracking_uri

CONFIGS = Path(__file__).parent.parent / "configs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(ray_cluster, emoji_shards):
    config = load_config(CONFIGS / "emoji.yaml", [
        f"data.path={emoji_shards}", "run.name=abl", "model.layers=1",
        "scaling.cpus_per_worker=0.25", "data.preprocess_cpus=0.25",
        "stages.contrastive.epochs=1", "stages.warmup.epochs=1",
        "stages.end_to_end.enabled=false", "stages.tuning.enabled=false",
    ])  # fmt: skip
    only = ["zero_shot_clip", "finetuned_clip", "linear_probe", "cma_no_both", "cma_clip"]
    state = ablation(config, only=only)
    return config, state


def _encoders(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("encoders.")}


def test_ablation_table_has_every_variant_run(finished):
    config, state = finished
    root = Path(state["configured"]).parent
    assert list(state["variants"]) == ["cma_clip", "zero_shot_clip", "finetuned_clip",
                                       "linear_probe", "cma_no_both"]  # fmt: skip
    for row in state["variants"].values():
        assert set(row["tasks"]) == {"category", "subcategory", "skin_tone"}
        for metrics in row["tasks"].values():
            assert 0 <= metrics["accuracy"] <= 1 and "recall_at_precision_0.9" in metrics
    table = (root / "ablation.md").read_text()
    assert table.strip() == format_ablation(state)
    assert VARIANTS["cma_no_both"].description in table
    assert (root / "linear_probe" / "report.html").is_file()
    # without modality-wise attention the image weight is exactly one half
    assert state["variants"]["cma_no_both"]["tasks"]["skin_tone"]["image_weight_mean"] == 0.5


def test_contrastive_stage_is_trained_once_and_shared(finished):
    config, state = finished
    root = Path(state["configured"]).parent
    shared = root / "cma_clip" / "checkpoints" / "contrastive"
    assert Path(state["contrastive"]) == shared
    assert not (root / "cma_no_both" / "checkpoints" / "contrastive").exists()
    start = _encoders(root / "cma_no_both" / "checkpoints" / "init")
    assert start.keys() == _encoders(shared).keys()
    assert all(torch.equal(start[k], _encoders(shared)[k]) for k in start)
    assert state["variants"]["finetuned_clip"]["encoders"] == str(shared)


def test_one_mlflow_parent_run_holds_the_variants(finished):
    config, state = finished
    client = MlflowClient(tracking_uri(None))
    parent = client.get_run(state["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cma_clip/skin_tone/accuracy"] == pytest.approx(
        state["variants"]["cma_clip"]["tasks"]["skin_tone"]["accuracy"]
    )
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {run.info.run_name for run in children} == {"cma_clip", "cma_no_both"}
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.json", "ablation.md"} <= artifacts


def test_noise_grid_draws_accuracy_against_rate(finished):
    config, state = finished
    root = Path(state["configured"]).parent
    results = noise_grid(root, kinds=["title_empty", "image_blank"], rates=[0.0, 1.0],
                         variants=["zero_shot_clip", "cma_clip"])  # fmt: skip

    clean = state["variants"]["cma_clip"]["tasks"]["category"]["accuracy"]
    cma = results["variants"]["cma_clip"]["accuracy"]
    assert cma["title_empty"]["category"][0] == pytest.approx(clean)
    # zero-shot CLIP never reads the title
    zero_shot = results["variants"]["zero_shot_clip"]["accuracy"]["title_empty"]
    assert zero_shot["category"][0] == zero_shot["category"][1]
    assert json.loads((root / "noise.json").read_text())["rates"] == [0.0, 1.0]
    with Image.open(root / "noise.png") as png:
        assert png.size == (3 * 420, 2 * 360)
