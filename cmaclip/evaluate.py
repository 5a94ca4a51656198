"""Scoring an exported model on any shard folder, in one process and without Ray.

Rows are streamed from Parquet batch by batch through the same `Preprocessor` that training
uses. A row whose image does not decode is skipped and counted; the report always satisfies
rows read = rows used + rows skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cmaclip.data.pipeline import InputSpec, local_batches
from cmaclip.data.shards import (
    DEFAULT_MAX_SKIPPED_FRACTION,
    check_skipped_budget,
    read_dataset_info,
)
from cmaclip.export import input_spec, load_model, write_text_atomic
from cmaclip.metrics import task_metrics, threshold_at_precision
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.noise import NoiseSetting, noisy_batches

logger = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 50


# A scorer maps a batch of images [B, 3, S, S] and token ids [B, L] to per-task probabilities
# [B, C] and the image weight lambda_I [B, K] (None for classifiers without one, the baselines).
Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, np.ndarray], np.ndarray | None]]


@dataclass
class Evaluation:
    report: dict[str, Any]
    labels: np.ndarray  # [N, K], -1 where missing
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # task -> [N, C]
    image_weight: np.ndarray | None = None  # [N, K]
    classes: dict[str, list[str]] = field(default_factory=dict)


class ModelScorer:
    """A CMA-CLIP model as a scorer: softmax probabilities and lambda_I per task."""

    def __init__(self, model: CMACLIP):
        self.model = model.eval()

    def __call__(self, images: torch.Tensor, text: torch.Tensor):
        out = self.model(images, text)
        probabilities = {
            task: logits.softmax(dim=-1).numpy() for task, logits in out.logits.items()
        }
        return probabilities, out.image_weight.numpy()


def evaluate_model(
    model: CMACLIP,
    data_dir: str | Path,
    *,
    split: str = "test",
    batch_size: int = 128,
    noise: NoiseSetting | None = None,
    seed: int = 0,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> Evaluation:
    """Predict every row of `split` and compute per-task metrics, optionally under noise."""
    return evaluate_scorer(
        ModelScorer(model), input_spec(model), data_dir, split=split, batch_size=batch_size,
        noise=noise, seed=seed, max_skipped_fraction=max_skipped_fraction,
    )  # fmt: skip


def evaluate_scorer(
    scorer: Scorer,
    spec: InputSpec,
    data_dir: str | Path,
    *,
    split: str = "test",
    batch_size: int = 128,
    noise: NoiseSetting | None = None,
    seed: int = 0,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> Evaluation:
    """Score every row of `split` with any scorer (a model or a baseline) and compute metrics.

    With `noise`, the rows it selects are corrupted (see `cmaclip.noise`) and the report says
    how many: `rows_corrupted` of those read, `rows_corrupted_used` of those scored. Metrics over
    a split whose rows were mostly skipped would describe some other data: more skipped rows
    than `max_skipped_fraction` of those read (or no usable row) stops the evaluation with
    `TooManySkippedError`.
    """
    data_dir = Path(data_dir)
    tasks = list(spec.tasks)
    expected = read_dataset_info(data_dir).get("rows", {}).get(split)

    labels, weights = [], []
    probabilities: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    read = skipped = unknown = corrupted = corrupted_used = 0
    skips: list[dict[str, str]] = []

    if noise is None:
        batches = local_batches(
            data_dir, split, spec, batch_size=batch_size, max_skipped_fraction=max_skipped_fraction
        )
    else:
        batches = noisy_batches(
            data_dir, split, spec, noise, seed=seed, batch_size=batch_size,
            max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
    label = f"evaluate {split}" + (f" {noise.label}" if noise else "")
    bar = tqdm(total=expected, desc=label, unit="row", mininterval=5, disable=None)
    with torch.no_grad():
        for batch in batches:
            valid = batch["valid"]
            read += len(valid)
            skipped += int((~valid).sum())
            unknown += int(batch["unknown_labels"].sum())
            if "corrupted" in batch:
                corrupted += int(batch["corrupted"].sum())
                corrupted_used += int((batch["corrupted"] & valid).sum())
            for row, error in zip(batch["id"][~valid], batch["error"][~valid], strict=True):
                if len(skips) < MAX_LISTED_SKIPS:
                    skips.append({"file": batch["file"], "row": str(row), "reason": str(error)})
            bar.update(len(valid))
            if not valid.any():
                continue

            probs, image_weight = scorer(
                torch.from_numpy(batch["images"][valid]), torch.from_numpy(batch["text"][valid])
            )
            for task in tasks:
                probabilities[task].append(probs[task])
            labels.append(batch["labels"][valid])
            if image_weight is not None:
                weights.append(image_weight)
    bar.close()
    check_skipped_budget(
        read,
        skipped,
        max_skipped_fraction,
        where=f"evaluating {data_dir} {split}",
        option="data.max_skipped_fraction",
        reasons=[f"{Path(s['file']).name} row {s['row']}: {s['reason']}" for s in skips],
    )

    labels_all = np.concatenate(labels) if labels else np.zeros((0, len(tasks)), np.int64)
    weights_all = np.concatenate(weights) if weights else None
    if weights_all is None and not labels:
        weights_all = np.zeros((0, len(tasks)))
    probs_all = {
        task: np.concatenate(parts) if parts else np.zeros((0, len(spec.tasks[task])))
        for task, parts in probabilities.items()
    }

    report: dict[str, Any] = {
        "data": str(data_dir),
        "split": split,
        "rows_read": read,
        "rows_used": read - skipped,
        "rows_skipped": skipped,
        "skipped": skips,
        "unknown_labels": unknown,
        "tasks": {
            task: task_metrics(
                labels_all[:, k],
                probs_all[task],
                None if weights_all is None else weights_all[:, k],
                len(spec.tasks[task]),
            )
            for k, task in enumerate(tasks)
        },
    }
    if noise is not None:
        report.update(
            noise=noise.to_dict(), label=noise.label, seed=seed, rows_corrupted=corrupted,
            rows_corrupted_used=corrupted_used,
        )  # fmt: skip
    if skipped:
        logger.warning("%s: %d of %d rows skipped (see report 'skipped')", split, skipped, read)
    if unknown:
        logger.warning(
            "%s: %d labels are not among the model's classes; they count as missing", split, unknown
        )
    return Evaluation(report, labels_all, probs_all, weights_all, dict(spec.tasks))


def precision_thresholds(evaluation: Evaluation, precision: float = 0.9) -> dict[str, float | None]:
    """Per task, the lowest top-class probability at which predictions reach `precision`."""
    thresholds = {}
    for k, (task, probs) in enumerate(evaluation.probabilities.items()):
        labelled = evaluation.labels[:, k] >= 0
        correct = probs[labelled].argmax(axis=1) == evaluation.labels[labelled, k]
        thresholds[task] = threshold_at_precision(correct, probs[labelled].max(axis=1), precision)
    return thresholds


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str,
    out: str | Path | None,
    *,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
    noise: list[NoiseSetting] | None = None,
    seed: int = 0,
) -> dict:
    """Load `model_dir`, score `split` of `data_dir` clean and under each noise setting.

    With `out`, the report JSON goes there and, beside it, its figures and a `.html` page.
    """
    if out and Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the report file to write")
    model, meta = load_model(model_dir)
    clean = evaluate_model(model, data_dir, split=split, max_skipped_fraction=max_skipped_fraction)
    report = clean.report
    report["model"] = str(model_dir)
    add_noise_sections(report, ModelScorer(model), input_spec(model), data_dir, split=split,
                       noise=noise or [], seed=seed,
                       max_skipped_fraction=max_skipped_fraction)  # fmt: skip
    if out:
        write_report(clean, out)
    return report


def add_noise_sections(
    report: dict[str, Any],
    scorer: Scorer,
    spec: InputSpec,
    data_dir: str | Path,
    *,
    split: str,
    noise: list[NoiseSetting],
    seed: int,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> None:
    """Add one section per noise setting to `report["noise"]`, with the clean report's metrics."""
    sections = []
    for setting in noise:
        noisy = evaluate_scorer(
            scorer, spec, data_dir, split=split, noise=setting, seed=seed,
            max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
        section = {key: noisy.report[key] for key in NOISE_SECTION_KEYS}
        sections.append(section)
    if sections:
        report["noise"] = sections


NOISE_SECTION_KEYS = (
    "label", "noise", "seed", "rows_read", "rows_used", "rows_skipped", "rows_corrupted",
    "rows_corrupted_used", "tasks",
)  # fmt: skip


def write_report(evaluation: Evaluation, out: str | Path) -> list[Path]:
    """Write the report JSON, its figures (`<stem>-figures/`) and `<stem>.html` beside it.

    Returns the paths written, for logging them as MLflow artifacts.
    """
    from cmaclip.reporting import write_figures, write_html

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = write_figures(evaluation, out.parent / f"{out.stem}-figures")
    html = write_html(evaluation.report, figures, out.with_suffix(".html"))
    write_text_atomic(out, json.dumps(evaluation.report, indent=2))  # last: it marks a run done
    return [out, html, out.parent / f"{out.stem}-figures"]


COLUMNS = {
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "recall_at_precision_0.9": "R@P0.9",
    "image_weight_mean": "image_weight",
    "support": "support",
}


def _table(tasks: dict[str, dict[str, Any]]) -> list[str]:
    width = max(12, *(len(task) + 2 for task in tasks))
    lines = [f"{'task':<{width}}" + "".join(f"{title:>14}" for title in COLUMNS.values())]
    lines.append("-" * len(lines[0]))
    for task, metrics in tasks.items():
        cells = []
        for name in COLUMNS:
            value = metrics.get(name)
            if value is None:
                cells.append(f"{'-':>14}")
            else:
                cells.append(f"{value:>14d}" if isinstance(value, int) else f"{value:>14.4f}")
        lines.append(f"{task:<{width}}" + "".join(cells))
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The per-task table printed at the end of a run or an evaluation, one per noise setting."""
    lines = _table(report["tasks"])
    lines.append(
        f"split {report['split']}: rows read {report['rows_read']}, used {report['rows_used']}, "
        f"skipped {report['rows_skipped']}"
    )
    for section in report.get("noise", []):
        lines.append("")
        lines.append(
            f"noise {section['label']} ({section['noise']['description']}; seed "
            f"{section['seed']}): {section['rows_corrupted']} of {section['rows_read']} rows "
            f"corrupted"
        )
        lines.extend(_table(section["tasks"]))
    return "\n".join(lines)
