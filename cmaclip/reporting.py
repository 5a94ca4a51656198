"""Figures and a self-contained HTML page for an evaluation report.

Per task: a confusion matrix (the most frequent classes when there are many), precision-recall
curves and a histogram of the image weight lambda_I. The HTML page embeds the PNGs as base64, so
it opens from disk in any browser, without a server or network.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and safe in Ray workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve  # noqa: E402

from cmaclip.metrics import _operating_points  # noqa: E402

if TYPE_CHECKING:
    from cmaclip.evaluate import Evaluation

logger = logging.getLogger(__name__)

TOP_CLASSES = 20  # a confusion matrix shows at most this many classes, by support
DPI = 100


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_figure(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                     task: str, *, top: int = TOP_CLASSES):  # fmt: skip
    """Row-normalised confusion matrix over the `top` most frequent true classes.

    Predictions of any other class fall into a last column, `other`, so each row still sums
    to one.
    """
    labelled = labels >= 0
    truth, predicted = labels[labelled], probabilities[labelled].argmax(axis=1)
    support = np.bincount(truth, minlength=len(classes))
    shown = [c for c in np.argsort(-support, kind="stable")[:top] if support[c] > 0]
    many = len(shown) < len(classes)
    index = {c: i for i, c in enumerate(shown)}
    columns = len(shown) + (1 if many else 0)

    matrix = np.zeros((len(shown), columns))
    for t, p in zip(truth, predicted, strict=True):
        if t in index:
            matrix[index[t], index.get(p, columns - 1)] += 1
    counts = matrix.copy()
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)

    size = 3.0 + 0.32 * columns
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=DPI)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    names = [_short(classes[c]) for c in shown]
    ax.set_xticks(range(columns), names + (["other"] if many else []), rotation=60, ha="right")
    ax.set_yticks(range(len(shown)), names)
    if columns <= 12:
        for (i, j), value in np.ndenumerate(counts):
            if value:
                color = "white" if matrix[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    scope = f"top {len(shown)} of {len(classes)} classes by support" if many else "all classes"
    note = "row-normalised; numbers are row counts" if columns <= 12 else "row-normalised"
    ax.set_title(f"{task}: confusion matrix ({scope})\n{note}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return fig


def precision_recall_figure(labels: np.ndarray, probabilities: np.ndarray, task: str):
    """Two curves: one-vs-rest over every (row, class) pair, and the top-1 prediction kept
    by confidence, whose recall at precision 0.9 is the report's R@P0.9."""
    labelled = labels >= 0
    truth, probs = labels[labelled], probabilities[labelled]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=DPI)
    if truth.size:
        onehot = np.eye(probs.shape[1], dtype=np.int64)[truth]
        precision, recall, _ = precision_recall_curve(onehot.ravel(), probs.ravel())
        average = average_precision_score(onehot.ravel(), probs.ravel())
        ax.plot(recall, precision, label=f"one-vs-rest, micro-averaged (AP {average:.3f})")

        correct = probs.argmax(axis=1) == truth
        _, top_precision, top_recall = _operating_points(correct, probs.max(axis=1))
        ax.plot(np.r_[0.0, top_recall], np.r_[top_precision[:1], top_precision],
                label="top-1 prediction kept by confidence")  # fmt: skip
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="precision 0.9")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{task}: precision against recall ({truth.size} labelled rows)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_weight_figure(image_weight: np.ndarray, task: str):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=DPI)
    ax.hist(image_weight, bins=np.linspace(0, 1, 41), color="tab:orange", edgecolor="white")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("λ_I, the weight on the image (1 - λ_I on the title)")
    ax.set_ylabel("rows")
    mean = float(np.mean(image_weight)) if image_weight.size else float("nan")
    ax.set_title(f"{task}: image weight per row (mean {mean:.3f})")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_figures(evaluation: Evaluation, folder: str | Path) -> dict[str, dict[str, Path]]:
    """Write each task's PNGs into `folder`; returns task -> figure name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for k, (task, probs) in enumerate(evaluation.probabilities.items()):
        labels = evaluation.labels[:, k]
        classes = evaluation.classes.get(task) or [str(i) for i in range(probs.shape[1])]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
        figures = {
            "confusion matrix": _save(
                confusion_figure(labels, probs, classes, task), folder / f"confusion_{safe}.png"
            ),
            "precision and recall": _save(
                precision_recall_figure(labels, probs, task),
                folder / f"precision_recall_{safe}.png",
            ),
        }
        if evaluation.image_weight is not None and evaluation.image_weight.shape[0]:
            figures["image weight"] = _save(
                image_weight_figure(evaluation.image_weight[:, k], task),
                folder / f"image_weight_{safe}.png",
            )
        written[task] = figures
    logger.info("figures in %s", folder)
    return written


def _rows(tasks: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        return str(value) if isinstance(value, int) else f"{value:.4f}"

    return [
        {
            "task": task,
            "accuracy": cell(metrics.get("accuracy")),
            "macro_f1": cell(metrics.get("macro_f1")),
            "rp": cell(metrics.get("recall_at_precision_0.9")),
            "image_weight": cell(metrics.get("image_weight_mean")),
            "support": cell(metrics.get("support")),
        }
        for task, metrics in tasks.items()
    ]


def write_html(
    report: dict[str, Any], figures: dict[str, dict[str, Path]], out: str | Path
) -> Path:
    """A single HTML file with the report's tables and every figure embedded."""
    import jinja2

    template = jinja2.Environment(autoescape=True).from_string(
        resources.files("cmaclip").joinpath("templates/report.html.j2").read_text()
    )
    embedded = {
        task: {name: base64.b64encode(path.read_bytes()).decode() for name, path in items.items()}
        for task, items in figures.items()
    }
    noise = [
        {"title": f"{s['label']}: {s['noise']['description']}", "seed": s["seed"],
         "corrupted": s["rows_corrupted"], "read": s["rows_read"], "rows": _rows(s["tasks"])}
        for s in report.get("noise", [])
    ]  # fmt: skip
    html = template.render(
        report=report,
        rows=_rows(report["tasks"]),
        noise=noise,
        figures=embedded,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out = Path(out)
    out.write_text(html, encoding="utf-8")
    return out
