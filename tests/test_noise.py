"""Noise kinds on the emoji-mini test split: rates, untouched rows, seeds; the report sections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cmaclip.cli import app
from cmaclip.data.pipeline import InputSpec, Preprocessor, local_batches
from cmaclip.data.shards import read_dataset_info
from cmaclip.export import save_model
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.noise import (
    NOISE_KINDS,
    NoiseSetting,
    corrupted_count,
    noisy_batches,
    parse_noise,
    plan_noise,
)


@pytest.fixture(scope="module")
def spec(emoji_shards) -> InputSpec:
    tasks = read_dataset_info(emoji_shards)["tasks"]
    return InputSpec(clip_name="cmaclip-tiny", image_size=64, context_length=32, tasks=tasks)


@pytest.fixture(scope="module")
def clean(emoji_shards, spec) -> dict[str, np.ndarray]:
    batches = list(local_batches(emoji_shards, "test", spec, batch_size=32))
    return {key: np.concatenate([b[key] for b in batches]) for key in ("id", "images", "text")}


def _noisy(emoji_shards, spec, setting, seed=0) -> dict[str, np.ndarray]:
    batches = list(noisy_batches(emoji_shards, "test", spec, setting, seed=seed, batch_size=32))
    keys = ("id", "images", "text", "corrupted", "valid")
    return {key: np.concatenate([b[key] for b in batches]) for key in keys}


@pytest.mark.parametrize("kind", list(NOISE_KINDS))
def test_each_kind_corrupts_exactly_the_rate_and_nothing_else(emoji_shards, spec, clean, kind):
    rows = len(clean["id"])
    noisy = _noisy(emoji_shards, spec, NoiseSetting(kind, 0.3))
    corrupted = noisy["corrupted"]

    assert corrupted.sum() == corrupted_count(0.3, rows) == round(0.3 * rows)
    assert list(noisy["id"]) == list(clean["id"])
    # the rows left alone are exactly as without noise
    np.testing.assert_array_equal(noisy["images"][~corrupted], clean["images"][~corrupted])
    np.testing.assert_array_equal(noisy["text"][~corrupted], clean["text"][~corrupted])

    # each corrupted row differs in the kind's modality only
    changed, kept = (
        ("text", "images") if NOISE_KINDS[kind].modality == "title" else ("images", "text")
    )
    np.testing.assert_array_equal(noisy[kept][corrupted], clean[kept][corrupted])
    for i in np.flatnonzero(corrupted):
        assert not np.array_equal(noisy[changed][i], clean[changed][i]), (kind, clean["id"][i])


def test_kinds_do_what_they_say(emoji_shards, spec, clean):
    empty = Preprocessor(spec).tokenizer([""]).numpy()[0]
    noisy = _noisy(emoji_shards, spec, NoiseSetting("title_empty", 0.5))
    assert all(np.array_equal(row, empty) for row in noisy["text"][noisy["corrupted"]])

    noisy = _noisy(emoji_shards, spec, NoiseSetting("image_blank", 0.5))
    assert not noisy["images"][noisy["corrupted"]].any()

    # a swapped image is another row's clean image
    noisy = _noisy(emoji_shards, spec, NoiseSetting("image_swap", 0.5))
    for i in np.flatnonzero(noisy["corrupted"]):
        image = noisy["images"][i]
        donors = [j for j, own in enumerate(clean["images"]) if np.array_equal(own, image)]
        assert donors and i not in donors

    # extra words keep the title's own tokens first
    noisy = _noisy(emoji_shards, spec, NoiseSetting("title_extra", 1.0, 2))
    for i in range(len(clean["id"])):
        own = clean["text"][i][clean["text"][i] != 0][:-1]  # without the end-of-text token
        assert np.array_equal(noisy["text"][i][: len(own)], own)
        assert (noisy["text"][i] != 0).sum() > (clean["text"][i] != 0).sum()

    # Gaussian noise stays within the pixel range of the normalised image
    noisy = _noisy(emoji_shards, spec, NoiseSetting("image_gaussian", 1.0, 0.5))
    change = noisy["images"] - clean["images"]
    assert np.abs(change).mean() > 0.1
    assert noisy["images"].min() >= -1.8 and noisy["images"].max() <= 2.2


def test_rows_depend_only_on_seed_and_ids(emoji_shards, spec):
    tasks = spec.tasks
    plan = plan_noise(emoji_shards, "test", tasks, NoiseSetting("title_swap", 0.25), seed=1)
    again = plan_noise(emoji_shards, "test", tasks, NoiseSetting("title_swap", 0.25), seed=1)
    other_seed = plan_noise(emoji_shards, "test", tasks, NoiseSetting("title_swap", 0.25), seed=2)
    other_kind = plan_noise(emoji_shards, "test", tasks, NoiseSetting("image_blank", 0.25), seed=1)
    higher = plan_noise(emoji_shards, "test", tasks, NoiseSetting("image_blank", 0.5), seed=1)

    np.testing.assert_array_equal(plan.selected, again.selected)
    assert plan.donors == again.donors
    assert not np.array_equal(plan.selected, other_seed.selected)
    np.testing.assert_array_equal(plan.selected, other_kind.selected)
    assert (higher.selected | plan.selected == higher.selected).all()  # lower rate nested in it
    # a swapped title comes from a row whose title differs
    ids = plan.row_ids
    for row, donor in plan.donor_ids.items():
        assert donor != ids[row]


def test_same_seed_gives_the_same_corruption(emoji_shards, spec):
    setting = NoiseSetting("image_gaussian", 0.4)
    a = _noisy(emoji_shards, spec, setting, seed=7)
    b = _noisy(emoji_shards, spec, setting, seed=7)
    c = _noisy(emoji_shards, spec, setting, seed=8)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["corrupted"], c["corrupted"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title_swap", "expected KIND:RATE"),
        ("salt:0.1", "unknown noise kind 'salt'"),
        ("title_swap:1.5", "not between 0 and 1"),
        ("title_empty:0.5:3", "takes no parameter"),
        ("image_gaussian:half", "must be numbers"),
    ],
)
def test_bad_noise_options_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_noise(text)


def test_evaluate_cli_adds_a_section_per_noise_with_figures_and_html(
    tmp_path, tiny_model_config, emoji_shards
):
    torch.manual_seed(0)
    model = CMACLIP(tiny_model_config, read_dataset_info(emoji_shards)["tasks"])
    save_model(model, tmp_path / "model")
    out = tmp_path / "eval" / "report.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", str(tmp_path / "model"), "--data", str(emoji_shards),
        "--out", str(out), "--noise", "title_empty:1", "--noise", "image_blank:0.5", "--seed", "3",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output

    report = json.loads(out.read_text())
    assert [s["label"] for s in report["noise"]] == ["title_empty:1", "image_blank:0.5"]
    assert report["noise"][0]["rows_corrupted"] == report["rows_read"]
    assert report["noise"][1]["rows_corrupted"] == corrupted_count(0.5, report["rows_read"])
    assert set(report["noise"][1]["tasks"]) == set(report["tasks"])
    assert "noise image_blank:0.5" in result.output

    figures = sorted(p.name for p in (tmp_path / "eval" / "report-figures").iterdir())
    assert len(figures) == 9 and "confusion_subcategory.png" in figures
    with Image.open(tmp_path / "eval" / "report-figures" / "image_weight_skin_tone.png") as png:
        assert png.format == "PNG" and png.size == (600, 400)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 9
    assert "http://" not in html and "https://" not in html
    assert "Noise image_blank:0.5" in html
