"""Loss pieces several methods share. One KD loss for every method that matches softened logits (kd, sall,
protokd, bidirectional): the papers differ only in whether the T^2 factor is applied and how the KL is averaged,
so those stay parameters instead of four near-copies."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["batchmean", "sum", "mean"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
            t_squared: bool = True, reduction: Reduction = "batchmean", dim: int = 1) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the class axis `dim`; the teacher carries no gradient.

    reduction: "batchmean" (sum over classes, mean over samples; Hinton), "sum" (over samples too; SALL's
    per-batch sums) or "mean" (mean over every element, classes and pixels; ProtoKD's official `.mean()`).
    t_squared: multiply by T^2 so the gradient's scale does not shrink with T (Hinton); ProtoKD omits it."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=dim)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=dim)
    if reduction == "mean":  # every element's mean, spelled out: torch warns that its own "mean" will change
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").mean()
    else:
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction=reduction)
    return kl * temperature**2 if t_squared else kl


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Cross-entropy over the labelled samples of a batch (label >= 0), mean over them; 0 (with a graph) when the
    batch has none, where F.cross_entropy's ignore_index would give NaN."""
    labelled = labels >= 0
    if labelled.all():
        return F.cross_entropy(logits, labels, **kwargs)
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], labels[labelled], **kwargs)
