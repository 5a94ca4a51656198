"""Per-task classification metrics, including the paper's recall at 90% precision.

Rows whose label is missing for a task are left out of that task's metrics (and counted in its
`support` only when labelled).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def _operating_points(
    correct: np.ndarray, confidence: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Threshold, precision and recall at every cut between distinct confidences.

    Predictions are ranked by confidence; keeping those at or above a threshold gives
    precision = correct kept / kept and recall = correct kept / all rows. Tied confidences are
    kept or dropped together, since no threshold separates them.
    """
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if correct.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)

    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    hits = np.cumsum(correct[order])
    kept = np.arange(1, correct.size + 1)
    cut = np.append(ranked[1:] < ranked[:-1], True)  # the next confidence is strictly lower

    return ranked[cut], hits[cut] / kept[cut], hits[cut] / correct.size


def recall_at_precision(
    correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9
) -> float:
    """Largest recall whose precision is still at least `precision`; 0 where none reaches it.

    Predictions are ranked by their top-class probability (see `_operating_points`), and recall
    is relative to all labelled rows.

    >>> recall_at_precision(np.array([1, 1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.6]))
    0.5
    """
    _, precisions, recalls = _operating_points(correct, confidence)
    reaching = precisions >= precision - 1e-12
    return float(recalls[reaching].max()) if reaching.any() else 0.0


def threshold_at_precision(
    correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9
) -> float | None:
    """The lowest confidence threshold whose kept predictions reach `precision`, if any."""
    thresholds, precisions, _ = _operating_points(correct, confidence)
    reaching = precisions >= precision - 1e-12
    return float(thresholds[reaching].min()) if reaching.any() else None


def task_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    image_weight: np.ndarray | None,
    num_classes: int,
) -> dict[str, float | int]:
    """Metrics of one task over the rows that have a label (`labels >= 0`).

    `image_weight` is None for a classifier without modality-wise weights (a baseline); the
    metrics then have no `image_weight_mean`.
    """
    labelled = labels >= 0
    y_true = labels[labelled]
    probs = probabilities[labelled]
    support = int(labelled.sum())
    weight = {}
    if image_weight is not None:
        weight["image_weight_mean"] = float(np.mean(image_weight) if image_weight.size else 0.0)
    if support == 0:
        return {"support": 0, **weight}

    y_pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    correct = y_pred == y_true
    all_classes = list(range(num_classes))
    with warnings.catch_warnings():
        # predicted classes absent from the labels are expected on small splits
        warnings.simplefilter("ignore", UserWarning)
        macro_accuracy = float(balanced_accuracy_score(y_true, y_pred))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_accuracy": macro_accuracy,
        "macro_f1": float(
            f1_score(y_true, y_pred, average="macro", labels=all_classes, zero_division=0)
        ),
        "recall_at_precision_0.9": recall_at_precision(correct, confidence, 0.9),
        **weight,
        "support": support,
    }


def macro_accuracy_from_confusion(confusion: np.ndarray) -> float:
    """Mean per-class recall over the classes that occur (balanced accuracy)."""
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float((np.diag(confusion)[present] / support[present]).mean())
