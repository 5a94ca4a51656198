"""Scoring an exported model on any shard folder, in one process and without Ray.

Rows are streamed from Parquet batch by batch through the same `Preprocessor` that training
uses. A row whose image does not decode is skipped and counted; the report always satisfies
rows read = rows used + rows skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cmaclip.data.pipeline import local_batches
from cmaclip.data.shards import (
    DEFAULT_MAX_SKIPPED_FRACTION,
    check_skipped_budget,
    read_dataset_info,
)
from cmaclip.export import input_spec, load_model
from cmaclip.metrics import task_metrics, threshold_at_precision
from cmaclip.model.cmaclip import CMACLIP

logger = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 50


@dataclass
class Evaluation:
    report: dict[str, Any]
    labels: np.ndarray  # [N, K], -1 where missing
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # task -> [N, C]
    image_weight: np.ndarray | None = None  # [N, K]


def evaluate_model(
    model: CMACLIP,
    data_dir: str | Path,
    *,
    split: str = "test",
    batch_size: int = 128,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> Evaluation:
    """Predict every row of `split` and compute per-task metrics.

    Metrics over a split whose rows were mostly skipped would describe some other data: more
    skipped rows than `max_skipped_fraction` of those read (or no usable row) stops the
    evaluation with `TooManySkippedError`.
    """
    data_dir = Path(data_dir)
    spec = input_spec(model)
    tasks = list(spec.tasks)
    expected = read_dataset_info(data_dir).get("rows", {}).get(split)

    labels, weights = [], []
    probabilities: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    read = skipped = unknown = 0
    skips: list[dict[str, str]] = []

    model.eval()
    bar = tqdm(total=expected, desc=f"evaluate {split}", unit="row", mininterval=5, disable=None)
    with torch.no_grad():
        batches = local_batches(
            data_dir, split, spec, batch_size=batch_size, max_skipped_fraction=max_skipped_fraction
        )
        for batch in batches:
            valid = batch["valid"]
            read += len(valid)
            skipped += int((~valid).sum())
            unknown += int(batch["unknown_labels"].sum())
            for row, error in zip(batch["id"][~valid], batch["error"][~valid], strict=True):
                if len(skips) < MAX_LISTED_SKIPS:
                    skips.append({"file": batch["file"], "row": str(row), "reason": str(error)})
            bar.update(len(valid))
            if not valid.any():
                continue

            out = model(
                torch.from_numpy(batch["images"][valid]), torch.from_numpy(batch["text"][valid])
            )
            for task in tasks:
                probabilities[task].append(out.logits[task].softmax(dim=-1).numpy())
            labels.append(batch["labels"][valid])
            weights.append(out.image_weight.numpy())
    bar.close()
    check_skipped_budget(
        read,
        skipped,
        max_skipped_fraction,
        where=f"evaluating {data_dir} {split}",
        option="data.max_skipped_fraction",
        reasons=[f"row {skip['row']}: {skip['reason']}" for skip in skips],
    )

    labels_all = np.concatenate(labels) if labels else np.zeros((0, len(tasks)), np.int64)
    weights_all = np.concatenate(weights) if weights else np.zeros((0, len(tasks)))
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
                labels_all[:, k], probs_all[task], weights_all[:, k], len(spec.tasks[task])
            )
            for k, task in enumerate(tasks)
        },
    }
    if skipped:
        logger.warning("%s: %d of %d rows skipped (see report 'skipped')", split, skipped, read)
    if unknown:
        logger.warning(
            "%s: %d labels are not among the model's classes; they count as missing", split, unknown
        )
    return Evaluation(report, labels_all, probs_all, weights_all)


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
) -> dict:
    """Load `model_dir`, score `split` of `data_dir`, and write the report to `out`."""
    if out and Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the report file to write")
    model, meta = load_model(model_dir)
    report = evaluate_model(
        model, data_dir, split=split, max_skipped_fraction=max_skipped_fraction
    ).report
    report["model"] = str(model_dir)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The per-task table printed at the end of a run or an evaluation."""
    columns = {
        "accuracy": "accuracy",
        "macro_f1": "macro_f1",
        "recall_at_precision_0.9": "R@P0.9",
        "image_weight_mean": "image_weight",
        "support": "support",
    }
    width = max(12, *(len(task) + 2 for task in report["tasks"]))
    lines = [f"{'task':<{width}}" + "".join(f"{title:>14}" for title in columns.values())]
    lines.append("-" * len(lines[0]))
    for task, metrics in report["tasks"].items():
        cells = []
        for name in columns:
            value = metrics.get(name, 0)
            cells.append(f"{value:>14d}" if isinstance(value, int) else f"{value:>14.4f}")
        lines.append(f"{task:<{width}}" + "".join(cells))
    lines.append(
        f"split {report['split']}: rows read {report['rows_read']}, used {report['rows_used']}, "
        f"skipped {report['rows_skipped']}"
    )
    return "\n".join(lines)
