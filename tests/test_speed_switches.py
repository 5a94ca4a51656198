"""The GPU speed switches of `scaling`, checked on the CPU: what each changes and what it keeps.

bf16 autocast and channels-last run on a CPU too, so their effect on the step is tested here;
on a GPU they are faster, which only a benchmark there can say.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

from cmaclip.config import ScalingConfig, StageConfig
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.model.encoders import register_model_configs
from cmaclip.training.loop import _lr_lambda, apply_speed_switches, make_optimizer, train_step

TASKS = {"color": ["red", "green", "blue"], "pattern": ["plain", "striped"]}
CPU = torch.device("cpu")


def _batch(size: int = 8) -> dict[str, torch.Tensor]:
    register_model_configs()
    tokenizer = open_clip.get_tokenizer("cmaclip-tiny")
    generator = torch.Generator().manual_seed(0)
    titles = [
        f"{color} {pattern} shirt" for color in TASKS["color"] for pattern in TASKS["pattern"]
    ]
    return {
        "images": torch.randn(size, 3, 64, 64, generator=generator),
        "text": tokenizer([titles[i % len(titles)] for i in range(size)]),
        "labels": torch.stack([torch.arange(size) % 3, torch.arange(size) % 2], dim=1),
        "valid": torch.ones(size, dtype=torch.bool),
        "unknown_labels": torch.zeros(size, dtype=torch.int64),
    }


def _setup(config, stage: str = "end_to_end"):
    torch.manual_seed(0)
    model = CMACLIP(config, TASKS)
    params = model.set_stage(stage)
    optimizer = make_optimizer(params, StageConfig(lr=1e-3))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(0, 100))
    return model.train(), optimizer, schedule


def _steps(model, optimizer, schedule, batch, n: int, **switches) -> list[float]:
    return [
        train_step(
            model, batch, stage="end_to_end", optimizer=optimizer, schedule=schedule,
            clip_loss=ClipLoss(), cache_level=None, loss_weights={}, device=CPU,
            where=f"step {i}", **switches,
        )[0]
        for i in range(n)
    ]  # fmt: skip


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_weights(tiny_model_config):
    model, optimizer, schedule = _setup(tiny_model_config)
    seen: list[torch.dtype] = []
    layer = model.encoders.clip.visual.transformer.resblocks[0].mlp.c_fc
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))

    losses = _steps(model, optimizer, schedule, _batch(), 6, precision="bf16")

    assert set(seen) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]  # it still learns the batch


def test_fp32_stays_float32(tiny_model_config):
    model, optimizer, schedule = _setup(tiny_model_config)
    seen: list[torch.dtype] = []
    layer = model.encoders.clip.visual.transformer.resblocks[0].mlp.c_fc
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))

    _steps(model, optimizer, schedule, _batch(), 1)

    assert set(seen) == {torch.float32}


def test_channels_last_feeds_the_patch_embedding_nhwc_and_changes_no_result(tiny_model_config):
    batch = _batch()
    plain = _steps(*_setup(tiny_model_config), batch, 3)

    model, optimizer, schedule = _setup(tiny_model_config)
    model = apply_speed_switches(model, ScalingConfig(channels_last=True))
    layouts: list[bool] = []
    conv = model.encoders.clip.visual.conv1
    conv.register_forward_pre_hook(
        lambda module, inputs: layouts.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    nhwc = _steps(model, optimizer, schedule, batch, 3, channels_last=True)

    assert layouts == [True, True, True]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc == pytest.approx(plain, rel=1e-4)


@pytest.mark.slow
def test_a_compiled_model_gives_the_eager_outputs(tiny_model_config):
    batch = _batch(4)
    torch.manual_seed(0)
    model = CMACLIP(tiny_model_config, TASKS).eval()
    with torch.no_grad():
        eager = model(batch["images"], batch["text"])
        model = apply_speed_switches(model, ScalingConfig(compile=True))
        compiled = model(batch["images"], batch["text"])

    assert set(model.state_dict()) == set(CMACLIP(tiny_model_config, TASKS).state_dict())
    for task in TASKS:
        torch.testing.assert_close(compiled.logits[task], eager.logits[task], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.image_weight, eager.image_weight, rtol=1e-4, atol=1e-4)
