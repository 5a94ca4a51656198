"""Training objectives: the summed multi-task cross-entropy and CLIP's contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmaclip.data.pipeline import MISSING


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over tasks of each task's mean cross-entropy over the rows labelled for it.

    `labels` is [B, K] with `MISSING` where a row has no label for a task: such rows add no loss
    for that task. A task with no labelled row in the batch still joins the graph with a zero
    term, so that every worker's backward pass touches the same parameters (DDP requires it).
    """
    weights = weights or {}
    total = labels.new_zeros((), dtype=torch.float32)
    per_task: dict[str, float] = {}

    for k, (task, task_logits) in enumerate(logits.items()):
        target = labels[:, k]
        labelled = target != MISSING
        if labelled.any():
            loss = F.cross_entropy(task_logits[labelled].float(), target[labelled])
            per_task[task] = float(loss.detach())
        else:
            loss = task_logits.sum() * 0.0
        total = total + weights.get(task, 1.0) * loss

    return total, per_task
