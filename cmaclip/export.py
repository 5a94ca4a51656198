"""Saving and loading weights: stage checkpoints and the exported `model/` folder.

Both are a folder with `model.safetensors` (the full CMA-CLIP state) and `model.json` (the model
config, the tasks with their classes and the input spec). Nothing is unpickled on load, and the
folder loads without Ray, so evaluation and serving need only torch and open_clip.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cmaclip import __version__
from cmaclip.config import ModelConfig
from cmaclip.data.pipeline import InputSpec
from cmaclip.model.cmaclip import CMACLIP

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT_VERSION = 1


def input_spec(model: CMACLIP) -> InputSpec:
    return InputSpec(
        clip_name=model.config.clip.name,
        image_size=model.encoders.image_size,
        context_length=model.encoders.context_length,
        tasks=model.classes,
    )


def save_model(model: CMACLIP, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write weights and metadata into `folder`, replacing it atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "cmaclip_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model.config.model_dump(mode="json"),
        "tasks": model.classes,
        "input": input_spec(model).to_dict(),
        **(extra or {}),
    }
    (staging / META).write_text(json.dumps(meta, indent=2))
    swap_in(staging, folder)
    return folder


def swap_in(staging: Path, folder: Path) -> None:
    """Move a fully written `staging` folder to `folder`, replacing any previous one whole."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a model folder with {META}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in ("model", "tasks", "input") if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; is this an exported CMA-CLIP model?")
    return meta


def load_weights(
    model: CMACLIP, folder: str | Path, *, parts: tuple[str, ...] | None = None
) -> None:
    """Load a checkpoint's weights into a model built for the same tasks and widths.

    With `parts` (state-dict prefixes such as `("encoders.",)`) only those weights are loaded,
    and only they must fit: the rest of the model keeps its own initial values. A search trial
    that changes the fusion widths starts that way from a checkpoint's encoders.
    """
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None

    own = model.state_dict()
    if parts is not None:
        state = {k: v for k, v in state.items() if k.startswith(parts)}
        own = {k: v for k, v in own.items() if k.startswith(parts)}
        if not state:
            raise ValueError(f"{path}: holds no weights under {list(parts)}")
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit this model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ: other classes, widths or architecture
        raise ValueError(f"{path}: weights do not fit this model: {error}") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CMACLIP, dict]:
    """Rebuild an exported model from its folder; returns the model in eval mode and its meta."""
    meta = read_meta(folder)
    config = ModelConfig.model_validate(meta["model"])
    spec = meta["input"]

    # the weights come from the folder, so never reach for a pretrained checkpoint here
    config = config.model_copy(deep=True)
    config.clip.pretrained = None
    config.clip.image_size = spec["image_size"]
    config.clip.context_length = spec["context_length"]

    model = CMACLIP(config, meta["tasks"])
    load_weights(model, folder)
    return model.to(device).eval(), meta
