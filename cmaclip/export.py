"""Saving and loading weights: stage checkpoints and the exported `model/` folder.

Both are a folder with `model.safetensors` (the full CMA-CLIP state) and `model.json` (the model
config, the tasks with their classes and the input spec). Nothing is unpickled on load, and the
folder loads without Ray, so evaluation and serving need only torch and open_clip.

A folder is written whole or not at all: everything goes into a hidden sibling first, is flushed
to disk, and only then takes the folder's name, so a crash mid-write leaves the previous folder
(or none) for the next stage or the server to load, never a half-written one. Weights whose
model config, tasks or shapes differ from the model they are loaded into are refused with a
message naming each difference.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from cmaclip import __version__
from cmaclip.config import ModelConfig, flatten, validation_message
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
    with staging_folder(folder) as staging:
        write_model_files(model, staging, extra)
    return folder


def write_model_files(model: CMACLIP, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """`model.safetensors` and `model.json` into an existing folder (a staging one, mostly)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "cmaclip_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model.config.model_dump(mode="json"),
        "tasks": model.classes,
        "input": input_spec(model).to_dict(),
        **(extra or {}),
    }
    (folder / META).write_text(json.dumps(meta, indent=2))


@contextlib.contextmanager
def staging_folder(folder: str | Path) -> Iterator[Path]:
    """A hidden sibling of `folder` to fill; on success it replaces `folder` whole.

    On an error the staging folder is removed and `folder` is left as it was. A process killed
    mid-write leaves only a hidden `.NAME-*` sibling, which no loader reads.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, and the folder itself, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def swap_in(staging: Path, folder: Path) -> None:
    """Move a fully written `staging` folder to `folder`, replacing any previous one whole.

    The files are flushed before the rename, so that after a power cut the new name never
    points at data that had not reached the disk. Between the two renames no `folder` exists
    (a reader then finds nothing, never a mix of old and new files).
    """
    _fsync_tree(staging)
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)
    _fsync(folder.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small file (a report, a marker) whole: into a sibling, flushed, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


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
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r}, but this code (cmaclip {__version__}) reads "
            f"up to {FORMAT_VERSION}; load it with the cmaclip version that wrote it "
            f"({meta.get('cmaclip_version', 'unknown')})"
        )
    return meta


# which model config keys decide the shapes and the computation of each part's weights
_PART_KEYS = {
    "encoders.": ("clip.name",),
    "fusion.": ("width", "sequence_attention", "layers", "heads"),
    "modality.": ("width", "modality_attention"),
    "heads.": ("width", "head.hidden", "head.depth"),
}


def _config_differences(
    meta: dict[str, Any], model: CMACLIP, parts: tuple[str, ...] | None
) -> list[str]:
    """`key: checkpoint X, this model Y` for each config value or task the weights depend on."""
    prefixes = parts or tuple(_PART_KEYS)
    keys = sorted({key for part, names in _PART_KEYS.items() if part in prefixes for key in names})
    theirs = flatten(meta.get("model", {}))
    ours = flatten(model.config.model_dump(mode="json"))
    differences = [
        f"model.{key}: checkpoint {theirs.get(key)!r}, this model {ours.get(key)!r}"
        for key in keys
        if theirs.get(key) != ours.get(key)
    ]
    if "encoders." in prefixes:
        spec = meta.get("input", {})
        for key in ("image_size", "context_length"):
            mine = getattr(model.encoders, key)
            if key in spec and spec[key] != mine:
                differences.append(f"input.{key}: checkpoint {spec[key]!r}, this model {mine!r}")
    if {"heads.", "modality."} & set(prefixes):
        tasks = meta.get("tasks", {})
        if list(tasks) != list(model.classes):
            differences.append(f"tasks: checkpoint {list(tasks)}, this model {list(model.classes)}")
        else:
            differences += [
                f"tasks.{task}: checkpoint {len(tasks[task])} classes, this model {len(names)}"
                + ("" if len(tasks[task]) != len(names) else " (other names or order)")
                for task, names in model.classes.items()
                if tasks[task] != names
            ]
    return differences


def load_weights(
    model: CMACLIP, folder: str | Path, *, parts: tuple[str, ...] | None = None
) -> None:
    """Load a checkpoint's weights into a model built for the same tasks and widths.

    With `parts` (state-dict prefixes such as `("encoders.",)`) only those weights are loaded,
    and only they must fit: the rest of the model keeps its own initial values. A search trial
    that changes the fusion widths starts that way from a checkpoint's encoders.

    A checkpoint whose `model.json` names another architecture (width, layers, attention heads,
    encoder, tasks or classes) for the parts loaded is refused before any weight is read, with
    each difference named: weights of equal shapes can still belong to another computation
    (4 attention heads against 8).
    """
    folder = Path(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    if (folder / META).is_file():
        differences = _config_differences(read_meta(folder), model, parts)
        if differences:
            raise ValueError(
                f"{folder}: the checkpoint was written for another model: " + "; ".join(differences)
            )
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
    shapes = [
        f"{key} {list(state[key].shape)} in the file, {list(own[key].shape)} in the model"
        for key in sorted(own)
        if state[key].shape != own[key].shape
    ]
    if shapes:
        raise ValueError(f"{path}: weights do not fit this model: {'; '.join(shapes[:5])}")
    model.load_state_dict(state, strict=False)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CMACLIP, dict]:
    """Rebuild an exported model from its folder; returns the model in eval mode and its meta."""
    meta = read_meta(folder)
    try:
        config = ModelConfig.model_validate(meta["model"])
    except ValidationError as error:
        # a key this code does not know, or a value it refuses: written by another version
        raise ValueError(
            validation_message(f"{Path(folder) / META}: model", error)
            + f" (written by cmaclip {meta.get('cmaclip_version', 'unknown')}, this is "
            f"{__version__})"
        ) from None
    spec = meta["input"]

    # the weights come from the folder, so never reach for a pretrained checkpoint here
    config = config.model_copy(deep=True)
    config.clip.pretrained = None
    config.clip.image_size = spec["image_size"]
    config.clip.context_length = spec["context_length"]

    model = CMACLIP(config, meta["tasks"])
    load_weights(model, folder)
    return model.to(device).eval(), meta
