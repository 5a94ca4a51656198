"""The CLIP baselines: zero-shot classification and the linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmaclip.baselines import (
    LinearProbe,
    ZeroShotScorer,
    clip_features,
    prompts,
    zero_shot_probabilities,
)
from cmaclip.data.pipeline import local_batches
from cmaclip.data.shards import read_dataset_info
from cmaclip.evaluate import evaluate_scorer
from cmaclip.export import input_spec
from cmaclip.model.cmaclip import CMACLIP


@pytest.fixture(scope="module")
def model(emoji_shards):
    from cmaclip.config import ModelConfig

    config = ModelConfig.model_validate({"clip": {"name": "cmaclip-tiny"}, "layers": 1})
    torch.manual_seed(0)
    return CMACLIP(config, read_dataset_info(emoji_shards)["tasks"]).eval()


def test_zero_shot_picks_the_prompt_nearest_the_image():
    # three class prompts along the axes; each image is near one of them
    classes = torch.eye(3) * 5.0
    images = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.1, 0.3], [0.0, -1.0, 0.2]])
    probabilities = zero_shot_probabilities(images, classes, scale=100.0)
    assert probabilities.argmax(dim=1).tolist() == [1, 0, 2]
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    # the scale sharpens, it does not reorder
    flat = zero_shot_probabilities(images, classes, scale=1.0)
    assert flat.argmax(dim=1).tolist() == [1, 0, 2] and flat.max() < probabilities.max()


def test_prompt_template():
    assert prompts(["cat face", "flag"], "an emoji of a {class}") == [
        "an emoji of a cat face",
        "an emoji of a flag",
    ]
    with pytest.raises(ValueError, match="no {class} placeholder"):
        prompts(["cat"], "a photo of a {}")


def test_zero_shot_scorer_matches_clip_by_hand(model, emoji_shards):
    """With a tiny CLIP, the scorer's answer is the prompt whose embedding is nearest."""
    import open_clip

    spec = input_spec(model)
    scorer = ZeroShotScorer(model.encoders, spec, template="{class}")
    batch = next(local_batches(emoji_shards, "test", spec, batch_size=16))
    images, text = torch.from_numpy(batch["images"]), torch.from_numpy(batch["text"])
    probabilities, weights = scorer(images, text)
    assert weights is None

    tokenizer = open_clip.get_tokenizer("cmaclip-tiny", context_length=spec.context_length)
    with torch.no_grad():
        image = F.normalize(model.encoders.encode_image(images).features, dim=-1)
        names = spec.tasks["skin_tone"]
        prompt = F.normalize(model.encoders.encode_text(tokenizer(names)).features, dim=-1)
    expected = (image @ prompt.T).argmax(dim=1).numpy()
    np.testing.assert_array_equal(probabilities["skin_tone"].argmax(axis=1), expected)
    # the title plays no part
    again, _ = scorer(images, torch.zeros_like(text))
    np.testing.assert_array_equal(again["skin_tone"], probabilities["skin_tone"])


def test_linear_probe_learns_its_split_and_round_trips(model, emoji_shards, tmp_path):
    spec = input_spec(model)
    probe = LinearProbe(model.encoders, spec)
    summary = probe.fit(emoji_shards, split="val", c=10.0)

    labels = np.concatenate([b["labels"] for b in local_batches(emoji_shards, "val", spec)])
    for k, task in enumerate(spec.tasks):
        known = labels[:, k] >= 0
        majority = np.bincount(labels[known, k]).max() / known.sum()
        assert summary["tasks"][task]["train_accuracy"] > majority + 0.1, task

    path = probe.save(tmp_path / "probe.npz")
    loaded = LinearProbe(model.encoders, spec).load(path)
    batch = next(local_batches(emoji_shards, "test", spec, batch_size=16))
    features = clip_features(
        model.encoders, torch.from_numpy(batch["images"]), torch.from_numpy(batch["text"])
    )
    for task, probabilities in probe.predict(features).items():
        np.testing.assert_allclose(loaded.predict(features)[task], probabilities)
        assert probabilities.shape == (16, len(spec.tasks[task]))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)

    report = evaluate_scorer(loaded, spec, emoji_shards, split="test").report
    assert "image_weight_mean" not in report["tasks"]["category"]
    assert 0 <= report["tasks"]["category"]["accuracy"] <= 1
