"""Export, reload and evaluation of a model, without Ray."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cmaclip.cli import app
from cmaclip.data.shards import read_dataset_info, shard_files
from cmaclip.evaluate import evaluate_model
from cmaclip.export import load_model, save_model
from cmaclip.model.cmaclip import CMACLIP


def _model(config, shards) -> CMACLIP:
    torch.manual_seed(0)
    return CMACLIP(config, read_dataset_info(shards)["tasks"]).eval()


def test_export_round_trip_gives_identical_outputs(tmp_path, tiny_model_config, emoji_shards):
    model = _model(tiny_model_config, emoji_shards)
    save_model(model, tmp_path / "model", {"note": "test"})
    loaded, meta = load_model(tmp_path / "model")

    assert meta["note"] == "test" and meta["tasks"] == model.classes
    images, text = torch.randn(2, 3, 64, 64), torch.zeros(2, 32, dtype=torch.long)
    text[:, 0], text[:, 1] = 49406, 49407
    with torch.no_grad():
        a, b = model(images, text), loaded(images, text)
    for task in model.task_names:
        torch.testing.assert_close(a.logits[task], b.logits[task])


def test_model_with_other_tasks_is_refused(tmp_path, tiny_model_config, emoji_shards):
    model = _model(tiny_model_config, emoji_shards)
    save_model(model, tmp_path / "model")
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["tasks"]["category"] = meta["tasks"]["category"][:3]
    meta_path.write_text(json.dumps(meta))

    with pytest.raises(
        ValueError, match=r"(?s)model\.safetensors: weights do not fit.*heads\.category"
    ):
        load_model(tmp_path / "model")


def test_evaluation_counts_every_row(tmp_path, tiny_model_config, emoji_shards):
    """A shard with an undecodable image: the row is skipped, counted and named."""
    data = tmp_path / "data"
    shutil.copytree(emoji_shards, data)
    path = shard_files(data, "test")[0]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0] = b"not an image"
    table = table.set_column(
        table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
    )
    pq.write_table(table, path)

    model = _model(tiny_model_config, emoji_shards)
    report = evaluate_model(model, data, split="test").report

    expected = read_dataset_info(data)["rows"]["test"]
    assert report["rows_read"] == expected
    assert report["rows_skipped"] == 1
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
    assert report["skipped"][0]["row"] == table.column("id")[0].as_py()
    for metrics in report["tasks"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert 0.0 <= metrics["image_weight_mean"] <= 1.0
        assert metrics["support"] <= report["rows_used"]


def test_evaluate_cli_writes_report(tmp_path, tiny_model_config, emoji_shards):
    save_model(_model(tiny_model_config, emoji_shards), tmp_path / "model")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(emoji_shards),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"category", "subcategory", "skin_tone"}
    assert "recall_at_precision_0.9" in report["tasks"]["skin_tone"]
    assert "skin_tone" in result.output


def test_shard_with_a_column_of_the_wrong_type_is_refused(
    tmp_path, tiny_model_config, emoji_shards
):
    data = tmp_path / "data"
    shutil.copytree(emoji_shards, data)
    path = shard_files(data, "test")[0]
    table = pq.read_table(path)
    index = table.schema.get_field_index("skin_tone")
    table = table.set_column(index, "skin_tone", pa.array(range(table.num_rows)))
    pq.write_table(table, path)

    with pytest.raises(ValueError, match=r"test-00000.parquet: column 'skin_tone' is int64"):
        evaluate_model(_model(tiny_model_config, emoji_shards), data, split="test")


def test_broken_model_folder_names_the_file(tmp_path, tiny_model_config, emoji_shards):
    save_model(_model(tiny_model_config, emoji_shards), tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_text("garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "model")

    (tmp_path / "model" / "model.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"model.json: missing key\(s\) \['model', 'tasks', 'input'\]"
    ):
        load_model(tmp_path / "model")
