"""The paper's CLIP baselines, as scorers that `evaluate_scorer` runs like a CMA-CLIP model.

- Zero-shot CLIP: each class name is put into a prompt (`a photo of a {class}` unless told
  otherwise), and the image is matched against the prompts' text embeddings by cosine
  similarity times CLIP's logit scale; the title is not used.
- Linear probe: a logistic regression per task on the frozen CLIP global features, the
  L2-normalised image and text embeddings side by side, fitted on the training split.

Both use only the CLIP encoders of a checkpoint (no fusion, no heads), so they run on the
encoders before any training (pretrained, or freshly initialised) or after the contrastive stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from cmaclip.data.pipeline import MISSING, InputSpec, local_batches
from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION, check_skipped_budget
from cmaclip.model.encoders import ClipEncoders, register_model_configs

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {class}"


def prompts(classes: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class; `{class}` in the template is replaced by the class name."""
    if "{class}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{class}} placeholder")
    return [template.replace("{class}", name) for name in classes]


def zero_shot_probabilities(
    image_features: torch.Tensor, class_features: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax over classes of scale x cosine(image, class prompt): [B, D], [C, D] -> [B, C]."""
    image = F.normalize(image_features, dim=-1)
    classes = F.normalize(class_features, dim=-1)
    return (scale * image @ classes.T).softmax(dim=-1)


class ZeroShotScorer:
    """CLIP's zero-shot classifier over every task's classes."""

    def __init__(
        self, encoders: ClipEncoders, spec: InputSpec, *, template: str = DEFAULT_TEMPLATE
    ):
        register_model_configs()
        self.encoders = encoders.eval()
        self.template = template
        tokenizer = open_clip.get_tokenizer(spec.clip_name, context_length=spec.context_length)
        with torch.no_grad():
            self.class_features = {
                task: self.encoders.encode_text(tokenizer(prompts(names, template))).features
                for task, names in spec.tasks.items()
            }
            self.scale = float(self.encoders.clip.logit_scale.exp())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor):
        image_features = self.encoders.encode_image(images).features
        probabilities = {
            task: zero_shot_probabilities(image_features, features, self.scale).numpy()
            for task, features in self.class_features.items()
        }
        return probabilities, None


@torch.no_grad()
def clip_features(encoders: ClipEncoders, images: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """[B, 2D]: the L2-normalised CLIP image and text embeddings, side by side."""
    image = F.normalize(encoders.encode_image(images).features, dim=-1)
    title = F.normalize(encoders.encode_text(text).features, dim=-1)
    return torch.cat([image, title], dim=-1).numpy()


class LinearProbe:
    """Per task, standardised features into a multinomial logistic regression.

    Kept as plain arrays (scaler mean and scale, weights, bias, the class ids seen in training),
    so that it saves to an `.npz` file and loads without unpickling anything.
    """

    def __init__(self, encoders: ClipEncoders, spec: InputSpec):
        self.encoders = encoders.eval()
        self.spec = spec
        self.parts: dict[str, dict[str, np.ndarray]] = {}

    def fit(
        self,
        data_dir: str | Path,
        *,
        split: str = "train",
        c: float = 1.0,
        batch_size: int = 128,
        max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
    ) -> dict[str, Any]:
        """Fit on `split`; returns the rows used per task and the training accuracy.

        Like training, it stops when more than `max_skipped_fraction` of the rows read were
        skipped, or when no row is usable.
        """
        features, labels = [], []
        rows = skipped = 0
        batches = local_batches(
            data_dir, split, self.spec, batch_size=batch_size,
            max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
        for batch in tqdm(batches, desc=f"probe features {split}", unit="batch", disable=None):
            valid = batch["valid"]
            rows += len(valid)
            skipped += int((~valid).sum())
            if valid.any():
                features.append(clip_features(
                    self.encoders, torch.from_numpy(batch["images"][valid]),
                    torch.from_numpy(batch["text"][valid]),
                ))  # fmt: skip
                labels.append(batch["labels"][valid])
        check_skipped_budget(
            rows, skipped, max_skipped_fraction, where=f"linear probe on {data_dir} {split}",
            option="data.max_skipped_fraction",
        )  # fmt: skip
        x, y = np.concatenate(features), np.concatenate(labels)

        summary: dict[str, Any] = {"rows_read": rows, "rows_skipped": skipped, "tasks": {}}
        for k, task in enumerate(self.spec.tasks):
            labelled = y[:, k] != MISSING
            scaler = StandardScaler().fit(x[labelled])
            seen = np.unique(y[labelled, k])
            part = {"mean": scaler.mean_, "scale": scaler.scale_, "classes": seen}
            if len(seen) > 1:
                regression = LogisticRegression(C=c, max_iter=2000)
                regression.fit(scaler.transform(x[labelled]), y[labelled, k])
                part |= {"coef": regression.coef_, "intercept": regression.intercept_}
            self.parts[task] = part
            predicted = self.predict(x[labelled])[task].argmax(axis=1)
            summary["tasks"][task] = {
                "rows": int(labelled.sum()),
                "classes_seen": int(len(seen)),
                "train_accuracy": float((predicted == y[labelled, k]).mean()),
            }
        logger.info("linear probe fitted on %d %s rows: %s", len(x), split, summary["tasks"])
        return summary

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities [B, C] over every class of each task (0 for classes never seen)."""
        out = {}
        for task, part in self.parts.items():
            probabilities = np.zeros((len(features), len(self.spec.tasks[task])))
            seen = part["classes"]
            if "coef" not in part:
                probabilities[:, seen[0]] = 1.0
            else:
                z = (features - part["mean"]) / part["scale"] @ part["coef"].T + part["intercept"]
                if z.shape[1] == 1:  # two classes: scikit-learn keeps one logit
                    p = 1.0 / (1.0 + np.exp(-z[:, 0]))
                    probabilities[:, seen] = np.stack([1 - p, p], axis=1)
                else:
                    z -= z.max(axis=1, keepdims=True)
                    e = np.exp(z)
                    probabilities[:, seen] = e / e.sum(axis=1, keepdims=True)
            out[task] = probabilities
        return out

    def __call__(self, images: torch.Tensor, text: torch.Tensor):
        return self.predict(clip_features(self.encoders, images, text)), None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{task}/{key}": value for task, part in self.parts.items()
                  for key, value in part.items()}  # fmt: skip
        np.savez(path, **arrays)
        path.with_suffix(".json").write_text(json.dumps({"tasks": list(self.parts)}))
        return path

    def load(self, path: str | Path) -> LinearProbe:
        with np.load(path) as arrays:
            for key in arrays.files:
                task, _, name = key.rpartition("/")
                if task not in self.spec.tasks:
                    raise ValueError(f"{path}: probe for task {task!r}, not one of this model's")
                self.parts.setdefault(task, {})[name] = arrays[key]
        return self
