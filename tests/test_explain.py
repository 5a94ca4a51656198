"""`cmaclip explain`: the attention maps it reads and the figure it draws."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cmaclip.cli import app
from cmaclip.data.shards import read_dataset_info, shard_files
from cmaclip.explain import DPI, FIGURE_SIZE, explain
from cmaclip.export import save_model
from cmaclip.model.cmaclip import CMACLIP


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, emoji_shards):
    from cmaclip.config import ModelConfig

    config = ModelConfig.model_validate(
        {"clip": {"name": "cmaclip-tiny"}, "width": 128, "layers": 2, "heads": 4, "dropout": 0.0}
    )
    torch.manual_seed(0)
    model = CMACLIP(config, read_dataset_info(emoji_shards)["tasks"])
    return save_model(model, tmp_path_factory.mktemp("explain") / "model")


@pytest.fixture(scope="module")
def item(emoji_shards) -> tuple[bytes, str]:
    row = pq.read_table(shard_files(emoji_shards, "test")[0]).slice(0, 1).to_pylist()[0]
    return row["image"], row["title"]


def test_attention_maps_follow_the_forward_pass(model_dir):
    from cmaclip.export import load_model

    model, _ = load_model(model_dir)
    images = torch.randn(2, 3, 64, 64)
    text = torch.zeros(2, 32, dtype=torch.long)
    text[:, 0], text[0, 1:4], text[0, 4], text[1, 1], text[1, 2] = 49406, 320, 49407, 500, 49407
    with torch.no_grad():
        maps, image_len = model.attention_maps(images, text)
        expected = model.embed(images, text)
        image = model.encoders.encode_image(images)
        title = model.encoders.encode_text(text)
        fusion = model.fusion
        _, out = fusion.sequence.attention_maps(
            fusion.image_proj(image.tokens) + fusion.modality_embedding[0],
            fusion.text_proj(title.tokens) + fusion.modality_embedding[1],
            title.padding_mask,
        )

    assert len(maps) == 2 and image_len == 65  # class token + 8 x 8 patches
    assert maps[-1].shape == (2, 65 + 32, 65 + 32)
    # each query's weights sum to one, and padded keys get none
    torch.testing.assert_close(maps[-1].sum(dim=-1), torch.ones(2, 97))
    assert maps[-1][0, :, 65 + 5 :].abs().max() == 0
    assert maps[-1][1, :, 65 + 3 :].abs().max() == 0
    # running the layers one by one gives the forward pass's I and T
    torch.testing.assert_close(out[:, 0], expected[0])
    torch.testing.assert_close(out[0, 65 + 4], expected[1][0])


def test_explain_picks_the_word_most_on_the_image(model_dir, item):
    image, title = item
    explanation = explain(model_dir, image, title)

    assert explanation.patch_attention.shape == (8, 8)
    assert (explanation.patch_attention >= 0).all()
    assert 0 < explanation.patch_attention.sum() <= explanation.image_share <= 1 + 1e-6
    best = max(share for _, share in explanation.word_shares)
    assert explanation.patch_attention.sum() == pytest.approx(best)
    assert len(explanation.word_shares) == len(explanation.words)
    assert explanation.pixels.shape == (64, 64, 3)

    other = explain(model_dir, image, title, token=explanation.words[0].text.upper())
    assert other.word.text == explanation.words[0].text
    with pytest.raises(ValueError, match="not a word of the title"):
        explain(model_dir, image, title, token="zebra-crossing-nowhere")


def test_explain_cli_writes_a_png_of_the_expected_size(tmp_path, model_dir, item):
    image, title = item
    (tmp_path / "item.png").write_bytes(image)
    out = tmp_path / "explain.png"
    result = CliRunner().invoke(app, [
        "explain", "--model", str(model_dir), "--image", str(tmp_path / "item.png"),
        "--title", title, "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[0])
    assert set(summary["tasks"]) == {"category", "subcategory", "skin_tone"}
    with Image.open(out) as png:
        assert png.size == (int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI)) == (1000, 500)
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # a drawn figure, not a blank canvas
