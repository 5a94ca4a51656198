"""The model's parts: shapes, the padding mask, the modality weights, ablations and freezing."""

from __future__ import annotations

import open_clip
import pytest
import torch

from cmaclip.config import ModelConfig
from cmaclip.model.cmaclip import CMACLIP, STAGE_GROUPS
from cmaclip.model.encoders import register_model_configs
from cmaclip.training.losses import multitask_loss

TASKS = {"color": ["red", "green", "blue"], "pattern": ["plain", "striped"]}


def _inputs(batch: int = 4, titles: list[str] | None = None):
    register_model_configs()
    tokenizer = open_clip.get_tokenizer("cmaclip-tiny")
    titles = titles or ["red striped shirt", "green plain cap", "blue", "a very long title " * 3]
    torch.manual_seed(0)
    return torch.randn(batch, 3, 64, 64), tokenizer(titles[:batch])


@pytest.fixture
def model(tiny_model_config) -> CMACLIP:
    torch.manual_seed(0)
    return CMACLIP(tiny_model_config, TASKS).eval()


def test_output_shapes(model):
    images, text = _inputs()
    out = model(images, text)

    assert out.logits["color"].shape == (4, 3)
    assert out.logits["pattern"].shape == (4, 2)
    assert out.image_weight.shape == (4, 2)
    assert out.image_embedding.shape == out.text_embedding.shape == (4, 128)


def test_image_tokens_are_class_token_then_patches(model):
    images, _ = _inputs()
    tokens = model.encoders.encode_image(images)
    # 64 px images in 8 px patches: 64 patches plus the class token
    assert tokens.tokens.shape == (4, 65, 128)
    assert torch.allclose(tokens.tokens[:, 0], tokens.features)


def test_padding_is_masked(model):
    """I and T are the same whether the title is padded to the context or cut to its length."""
    images, text = _inputs(batch=1, titles=["red striped shirt"])
    length = int(text.argmax(dim=-1)) + 1
    encoders, fusion = model.encoders, model.fusion

    def global_embeddings(tokens):
        image = encoders.encode_image(images)
        title = encoders.encode_text(tokens)
        return fusion.sequence(
            fusion.image_proj(image.tokens) + fusion.modality_embedding[0],
            fusion.text_proj(title.tokens) + fusion.modality_embedding[1],
            title.padding_mask,
            title.eot_index,
        )

    with torch.no_grad():
        padded = global_embeddings(text)
        # the text tower sees the full context either way; only SA's view of padding changes
        title = encoders.encode_text(text)
        image = encoders.encode_image(images)
        trimmed = fusion.sequence(
            fusion.image_proj(image.tokens) + fusion.modality_embedding[0],
            fusion.text_proj(title.tokens[:, :length]) + fusion.modality_embedding[1],
            title.padding_mask[:, :length],
            title.eot_index,
        )
    assert text[0, length:].eq(0).all() and length < text.shape[1]
    torch.testing.assert_close(padded[0], trimmed[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], trimmed[1], atol=1e-5, rtol=1e-5)


def test_modality_weights_sum_to_one_and_fuse(model):
    images, text = _inputs()
    with torch.no_grad():
        image_embedding, text_embedding = model.embed(images, text)
        fused, image_weight = model.modality(image_embedding, text_embedding)

    assert ((image_weight > 0) & (image_weight < 1)).all()
    for k in range(len(TASKS)):
        lam = image_weight[:, k : k + 1]
        expected = lam * image_embedding + (1 - lam) * text_embedding
        torch.testing.assert_close(fused[:, k], expected)


def test_modality_attention_off_is_plain_average(tiny_model_config):
    config = tiny_model_config.model_copy(update={"modality_attention": False})
    model = CMACLIP(config, TASKS).eval()
    images, text = _inputs()
    with torch.no_grad():
        out = model(images, text)
    assert torch.all(out.image_weight == 0.5)


def test_sequence_attention_off_uses_clip_global_features(tiny_model_config):
    config = tiny_model_config.model_copy(update={"sequence_attention": False})
    model = CMACLIP(config, TASKS).eval()
    images, text = _inputs()
    with torch.no_grad():
        image_embedding, text_embedding = model.embed(images, text)
        image_features = model.encoders.clip.encode_image(images)[0]
        text_features = model.encoders.clip.encode_text(text)

    assert model.fusion.sequence is None
    torch.testing.assert_close(image_embedding, image_features)
    torch.testing.assert_close(text_embedding, text_features)


def _named(model: CMACLIP, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("stage", list(STAGE_GROUPS))
def test_stage_freezes_exactly_its_groups(model, stage):
    """Frozen: no gradient, no optimizer state, unchanged weights; trained: weights move."""
    params = model.set_stage(stage)
    trained = _named(model, params)
    prefixes = {
        "encoders": ("encoders.",),
        "fusion": ("fusion.",),
        "tasks": ("modality.", "heads."),
    }
    expected = {
        name
        for name, _ in model.named_parameters()
        for group in STAGE_GROUPS[stage]
        if name.startswith(prefixes[group])
    }
    expected -= {"encoders.clip.logit_scale"} if stage != "contrastive" else set()
    assert trained == expected

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    images, text = _inputs()
    labels = torch.tensor([[0, 1], [1, 0], [2, -1], [-1, -1]])
    model.train()
    for _ in range(2):
        if stage == "contrastive":
            image, title, scale = model(images, text, contrastive=True)
            loss = (scale * image @ title.T).logsumexp(dim=1).mean()
        else:
            loss, _ = multitask_loss(model(images, text).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state_ids = {id(p) for p in optimizer.state}
    for name, p in model.named_parameters():
        if name in trained:
            assert id(p) in state_ids
            continue
        assert p.grad is None, name
        assert id(p) not in state_ids, name
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trained)
    # frozen modules stay in eval mode inside model.train()
    frozen_modules = [m for m in model._frozen]
    assert all(not m.training for m in frozen_modules)


def test_missing_labels_add_no_loss():
    logits = {"a": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "b": torch.zeros(2, 3)}
    labels = torch.tensor([[0, -1], [-1, -1]])
    total, per_task = multitask_loss(logits, labels, {"a": 2.0})

    expected_a = torch.nn.functional.cross_entropy(logits["a"][:1], torch.tensor([0]))
    torch.testing.assert_close(total, 2.0 * expected_a)
    assert set(per_task) == {"a"}


def test_unknown_architecture_is_refused():
    config = ModelConfig.model_validate({"clip": {"name": "no-such-clip"}})
    with pytest.raises(ValueError, match="no-such-clip"):
        CMACLIP(config, TASKS)


def test_missing_local_checkpoint_is_refused(tmp_path):
    config = ModelConfig.model_validate(
        {"clip": {"name": "cmaclip-tiny", "pretrained": str(tmp_path / "absent.pt")}}
    )
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        CMACLIP(config, TASKS)


def test_local_checkpoint_loads(tmp_path, tiny_model_config):
    """A `pretrained` file path loads those weights, with no network."""
    source = CMACLIP(tiny_model_config, TASKS).encoders.clip
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)

    config = tiny_model_config.model_copy(deep=True)
    config.clip.pretrained = str(path)
    loaded = CMACLIP(config, TASKS).encoders.clip
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_extreme_aspect_ratio_is_skipped_not_resized():
    """A 1x5000 strip would become a 64x320000 image before the crop: skip it and say why."""
    import io

    import numpy as np
    from PIL import Image

    from cmaclip.data.pipeline import InputSpec, Preprocessor

    def png(size):
        buffer = io.BytesIO()
        Image.new("RGB", size, "red").save(buffer, format="PNG")
        return buffer.getvalue()

    preprocess = Preprocessor(InputSpec("cmaclip-tiny", 64, 32, {"color": ["red"]}))
    batch = {
        "id": np.array(["strip", "square"], dtype=object),
        "image": np.array([png((1, 5000)), png((80, 80))], dtype=object),
        "title": np.array(["a", None], dtype=object),
        "color": np.array(["red", "blue"], dtype=object),
    }
    out = preprocess(batch)
    assert out["valid"].tolist() == [False, True]
    assert "aspect ratio" in out["error"][0]
    assert out["labels"][:, 0].tolist() == [0, -1] and out["unknown_labels"].tolist() == [0, 1]

    # the predictor refuses the same strip, as a client's mistake (400) naming the image
    from cmaclip.predict import ItemError, ItemPreparer

    preparer = ItemPreparer(InputSpec("cmaclip-tiny", 64, 32, {"color": ["red"]}))
    with pytest.raises(ItemError, match=r"^image: aspect ratio of 1x5000 exceeds 20:1$") as error:
        preparer.prepare("a", png((1, 5000)))
    assert (error.value.field, error.value.status) == ("image", 400)
    assert preparer.prepare("a", png((80, 80))).image.shape == (3, 64, 64)


@pytest.mark.parametrize("layers", [1, 3])
def test_read_out_positions_match_the_whole_encoder(layers):
    """The last layer, run for the class and end-of-text tokens only, equals the whole encoder
    at those positions: outputs and every parameter's gradient, in training mode."""
    from cmaclip.model.attention import SequenceAttention

    torch.manual_seed(0)
    attention = SequenceAttention(width=64, layers=layers, heads=4, dropout=0.0).train()
    image, text = torch.randn(6, 17, 64), torch.randn(6, 9, 64)
    eot_index = torch.tensor([0, 2, 8, 4, 8, 1])
    text_padding = torch.arange(9) > eot_index[:, None]

    def whole_encoder():
        padding = torch.cat([text_padding.new_zeros(6, 17), text_padding], dim=1)
        out = attention.norm(
            attention.encoder(torch.cat([image, text], dim=1), src_key_padding_mask=padding)
        )
        return out[:, 0], out[torch.arange(6), 17 + eot_index]

    parameters = list(attention.parameters())
    read_out = attention(image, text, text_padding, eot_index)
    reference = whole_encoder()
    for ours, theirs in zip(read_out, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)

    ours = torch.autograd.grad(sum(x.pow(2).sum() for x in read_out), parameters)
    theirs = torch.autograd.grad(sum(x.pow(2).sum() for x in reference), parameters)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # float32 sums, reordered


def test_sequence_attention_needs_a_layer():
    from cmaclip.model.attention import SequenceAttention

    with pytest.raises(ValueError, match="model.layers is 0"):
        SequenceAttention(width=64, layers=0, heads=4, dropout=0.0)
