"""Predicting single items: turning a title and image bytes into per-task answers.

The same pieces serve `cmaclip predict` (one process, the whole model) and the Ray Serve
application (ingress, encoder and head deployments), so the two give the same probabilities:
`ItemPreparer` makes model inputs from one item, `TaskScorer` is one task's modality-wise
attention and head, and `task_answer` turns a task's probabilities into the answer a client
reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from torch import nn

from cmaclip.config import ModelConfig, resolve_path
from cmaclip.data.images import DEFAULT_MAX_PIXELS, decode_image
from cmaclip.data.pipeline import InputSpec
from cmaclip.export import META, WEIGHTS, load_model, read_meta
from cmaclip.model.attention import ModalityAttention, TaskHead
from cmaclip.model.encoders import register_model_configs

logger = logging.getLogger(__name__)

PRECISION_KEY = "precision_0.9"  # the operating point stored with every exported model
MISSING_IMAGE = "a blank image (every pixel at the encoder's mean colour)"
MISSING_TITLE = "an empty title (start and end-of-text tokens only)"


class ItemError(ValueError):
    """An item that cannot be classified as sent.

    `field` names the part that is wrong and `status` is the HTTP status a server answers
    with: 400 for bytes that are no image, 413 for one over a size limit, 422 for a missing part.
    """

    def __init__(self, message: str, *, field: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass
class PreparedItem:
    """Model inputs for one item, plus what the answer must tell about how they were made."""

    image: np.ndarray  # [3, S, S] float32, normalised as in training
    text: np.ndarray  # [L] int64 token ids
    notes: dict[str, Any] = field(default_factory=dict)


class ItemPreparer:
    """Decode, transform and tokenize one item exactly as the training pipeline does.

    A missing modality gets a neutral stand-in and a note saying so; a title longer than the
    context is cut (open_clip keeps the end-of-text token last) and the note says so too.
    """

    def __init__(self, spec: InputSpec | dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS):
        if isinstance(spec, dict):
            spec = InputSpec(**spec)
        self.spec = spec
        self.max_pixels = max_pixels

        register_model_configs()
        self.tokenizer = open_clip.get_tokenizer(spec.clip_name, context_length=spec.context_length)
        self.transform = open_clip.image_transform(spec.image_size, is_train=False)

    def prepare(self, title: str | None, image: bytes | None) -> PreparedItem:
        if title is None and image is None:
            raise ItemError("give a title, an image, or both", field="title", status=422)
        notes: dict[str, Any] = {}

        if image is None:
            pixels = np.zeros((3, self.spec.image_size, self.spec.image_size), np.float32)
            notes["missing"] = {"modality": "image", "stand_in": MISSING_IMAGE}
        else:
            pixels = self._image(image)

        if title is None:
            title = ""
            notes["missing"] = {"modality": "title", "stand_in": MISSING_TITLE}
        text = self.tokenizer([title]).numpy()[0].astype(np.int64)
        if self._truncated(title):
            notes["title_truncated"] = True
        return PreparedItem(pixels, text, notes)

    def _image(self, data: bytes) -> np.ndarray:
        from cmaclip.data.images import ImageDecodeError, ImageTooLargeError

        try:
            picture = decode_image(data, max_pixels=self.max_pixels)
        except ImageTooLargeError as error:
            raise ItemError(f"image: {error}", field="image", status=413) from None
        except ImageDecodeError as error:  # an extreme aspect ratio too, as in training
            raise ItemError(f"image: {error}", field="image") from None
        return self.transform(picture).numpy()

    def _truncated(self, title: str) -> bool:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # Limitation: only open_clip's own BPE tokenizer reports truncation
            return False
        return len(encode(title)) + 2 > self.spec.context_length  # + start and end tokens


def decode_base64(value: str, *, max_bytes: int) -> bytes:
    """Image bytes from base64 text (a `data:` URL prefix is allowed), with a size limit."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > max_bytes:
        raise ItemError(
            f"image: about {len(value) * 3 // 4} bytes, more than the limit of {max_bytes}",
            field="image",
            status=413,
        )
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as error:
        raise ItemError(f"image: not valid base64 ({error})", field="image") from None


class TaskScorer(nn.Module):
    """One task's modality-wise attention and MLP head, cut out of a CMA-CLIP model.

    It reads only its own tensors from `model.safetensors`, so a head deployment holds a few
    thousand parameters, not the encoders.
    """

    def __init__(self, config: ModelConfig, num_tasks: int, num_classes: int):
        super().__init__()
        self.modality = ModalityAttention(
            width=config.width, num_tasks=1, enabled=config.modality_attention
        )
        self.head = TaskHead(
            width=config.width,
            hidden=config.head.hidden,
            depth=config.head.depth,
            dropout=config.head.dropout,
            num_classes=num_classes,
        )

    @classmethod
    def from_folder(cls, folder: str | Path, task: str) -> TaskScorer:
        meta = read_meta(folder)
        if task not in meta["tasks"]:
            raise ValueError(
                f"{Path(folder) / META}: no task {task!r} (it has {list(meta['tasks'])})"
            )
        config = ModelConfig.model_validate(meta["model"])
        index = list(meta["tasks"]).index(task)
        scorer = cls(config, len(meta["tasks"]), len(meta["tasks"][task]))

        prefix = f"heads.{task}."
        with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as weights:
            query = weights.get_tensor("modality.query")[index : index + 1]
            head = {
                key.removeprefix("heads.").removeprefix(f"{task}."): weights.get_tensor(key)
                for key in weights.keys()  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefix)
            }
        scorer.modality.query.data.copy_(query)
        scorer.head.load_state_dict(head)
        return scorer.eval()

    @torch.no_grad()
    def forward(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor):
        """Probabilities [B, C] and the image weight lambda_I [B]."""
        fused, image_weight = self.modality(image_embedding, text_embedding)  # [B,1,W], [B,1]
        return self.head(fused[:, 0]).softmax(dim=-1), image_weight[:, 0]


def task_answer(
    probabilities: np.ndarray,
    image_weight: float,
    classes: list[str],
    threshold: float | None,
    top_k: int,
) -> dict[str, Any]:
    """The answer for one task of one item.

    `abstained` is true when the top probability is below the threshold at which validation
    predictions reached 90% precision; with no such threshold (the task never reached it) the
    model always abstains.
    """
    order = np.argsort(-probabilities, kind="stable")[: max(1, top_k)]
    best = int(order[0])
    probability = float(probabilities[best])
    return {
        "label": classes[best],
        "probability": probability,
        "top_k": [{"label": classes[i], "probability": float(probabilities[i])} for i in order],
        "image_weight": float(image_weight),
        "threshold": threshold,
        "abstained": threshold is None or probability < threshold,
    }


def weights_digest(folder: str | Path, prefixes: tuple[str, ...] = ("encoders.", "fusion.")) -> str:
    """A hash of the tensors under `prefixes`: equal digests mean the same shared part.

    A head from another model folder may only be served behind this encoder when the two
    folders share encoders and fusion weights (e.g. a `tuning` run from the same checkpoint).
    """
    digest = hashlib.sha256()
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as weights:
        for key in sorted(weights.keys()):  # noqa: SIM118
            if key.startswith(prefixes):
                digest.update(key.encode())
                digest.update(weights.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()


def model_version(folder: str | Path) -> str:
    """A short version string: the run name and the start of the weights file's hash."""
    meta = read_meta(folder)
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS, "rb") as weights:
        for chunk in iter(lambda: weights.read(1 << 20), b""):
            digest.update(chunk)
    return f"{meta.get('run', Path(folder).resolve().parent.name)}-{digest.hexdigest()[:12]}"


def thresholds(meta: dict[str, Any]) -> dict[str, float | None]:
    return meta.get("thresholds", {}).get(PRECISION_KEY, {})


def resolve_model(uri: str | Path) -> Path:
    """A local model folder from a folder path or an MLflow artifact URI (`runs:/ID/model`)."""
    text = str(uri)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        import mlflow

        from cmaclip import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri(None))
        logger.info("downloading model %s from MLflow", text)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    return resolve_path(text)


class Predictor:
    """Offline prediction with the whole model in this process: what `cmaclip predict` runs."""

    def __init__(self, folder: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = resolve_model(folder)
        self.model, self.meta = load_model(self.folder)
        self.preparer = ItemPreparer(self.meta["input"], max_pixels=max_pixels)
        self.thresholds = thresholds(self.meta)

    @torch.no_grad()
    def predict(
        self,
        items: list[tuple[str | None, bytes | None]],
        *,
        tasks: list[str] | None = None,
        top_k: int = 3,
    ) -> list[dict[str, Any]]:
        tasks = tasks or list(self.model.task_names)
        unknown = [task for task in tasks if task not in self.model.classes]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the model has {self.model.task_names}")

        prepared = [self.preparer.prepare(title, image) for title, image in items]
        images = torch.from_numpy(np.stack([item.image for item in prepared]))
        text = torch.from_numpy(np.stack([item.text for item in prepared]))
        out = self.model(images, text)

        answers = []
        for i, item in enumerate(prepared):
            answer: dict[str, Any] = {"tasks": {}, **item.notes}
            for task in tasks:
                k = self.model.task_names.index(task)
                probabilities = out.logits[task][i].softmax(dim=-1).numpy()
                answer["tasks"][task] = task_answer(
                    probabilities,
                    float(out.image_weight[i, k]),
                    self.model.classes[task],
                    self.thresholds.get(task),
                    top_k,
                )
            answers.append(answer)
        return answers


def to_json(answers: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(answer) for answer in answers)
