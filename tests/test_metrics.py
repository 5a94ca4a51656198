"""Metrics on small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cmaclip.metrics import (
    macro_accuracy_from_confusion,
    recall_at_precision,
    task_metrics,
    threshold_at_precision,
)


def test_recall_at_precision_by_hand():
    # ranked: hit, hit, miss, hit -> precision 1, 1, 2/3, 3/4; recall .25, .5, .5, .75
    correct = np.array([1, 1, 0, 1])
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    assert recall_at_precision(correct, confidence, 0.9) == 0.5
    assert recall_at_precision(correct, confidence, 0.7) == 0.75
    assert threshold_at_precision(correct, confidence, 0.9) == 0.8


def test_recall_at_precision_is_order_free():
    correct = np.array([1, 0, 1, 1])
    confidence = np.array([0.6, 0.7, 0.8, 0.9])
    assert recall_at_precision(correct, confidence, 0.9) == 0.5


def test_ties_are_kept_together():
    # the top two tie: keeping only one of them is not a threshold anyone can set
    correct = np.array([1, 0, 1])
    confidence = np.array([0.9, 0.9, 0.5])
    assert recall_at_precision(correct, confidence, 0.9) == 0.0
    assert recall_at_precision(correct, confidence, 0.5) == pytest.approx(2 / 3)


def test_no_threshold_reaches_the_precision():
    assert recall_at_precision(np.array([0, 0, 1]), np.array([0.9, 0.8, 0.1]), 0.9) == 0.0
    assert threshold_at_precision(np.array([0, 0]), np.array([0.9, 0.8]), 0.9) is None
    assert recall_at_precision(np.array([]), np.array([]), 0.9) == 0.0


def test_all_correct_gives_full_recall():
    assert recall_at_precision(np.ones(5), np.linspace(0.2, 0.9, 5), 0.9) == 1.0


def test_task_metrics_skip_missing_labels():
    labels = np.array([0, 1, -1, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    metrics = task_metrics(labels, probabilities, np.array([0.2, 0.4, 0.6, 0.8]), 2)

    assert metrics["support"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_accuracy"] == pytest.approx((1 + 0.5) / 2)
    # ranked by confidence .9 hit, .8 hit, .7 miss
    assert metrics["recall_at_precision_0.9"] == pytest.approx(2 / 3)
    assert metrics["image_weight_mean"] == pytest.approx(0.5)


def test_macro_accuracy_from_confusion():
    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    assert macro_accuracy_from_confusion(confusion) == pytest.approx((0.75 + 0.5) / 2)
