"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679): Hinton's KL split at the
target class into two terms that are weighted apart,

    KD = TCKD + (1 - p_t^T) NCKD
    TCKD = KL(b^T || b^S), b = (p_target, 1 - p_target): how sure each model is of the target class
    NCKD = KL(p~^T || p~^S), p~ = softmax over the non-target classes alone (the target left out)
    L = ce_weight * CE(y) + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD)

with the paper's CIFAR defaults alpha = 1, beta = 8, T = 4; w ramps linearly over the first `warmup_epochs`
epochs (w = min((epoch + 1) / warmup_epochs, 1), epoch counted from 0; as the official code steps it per epoch).
Both terms are the one KD loss (kdcli.methods.losses.kd_loss) on two views of the logits, so T^2 and the
per-sample mean are Hinton's.

Unlabeled paired samples (label -1) have no target class; ours, not the paper's: the teacher's predicted class
stands in for it, so they take part in TCKD and NCKD (as in `kd`, the teacher labels what the raters never did)
and not in the CE. The split KD = TCKD + (1 - p_t) NCKD holds around any class, so this is still Hinton's KL,
reweighted. A 20-epoch warm-up is long for kdcli's 30-epoch default; `-p warmup_epochs=2` shortens it."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss, labelled_cross_entropy


@dataclasses.dataclass
class DKDParams:
    temperature: float = dataclasses.field(default=4.0, metadata={"help": "softmax temperature T"})
    alpha: float = dataclasses.field(default=1.0, metadata={"help": "weight of TCKD (target vs the rest)"})
    beta: float = dataclasses.field(default=8.0, metadata={"help": "weight of NCKD (among the non-target classes)"})
    warmup_epochs: int = dataclasses.field(default=20, metadata={
        "help": "epochs over which the TCKD/NCKD weight ramps linearly to 1 (0: none)"})
    ce_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the hard-label CE"})


def non_target_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C - 1): each row without its target class's logit, the others in order."""
    keep = ~F.one_hot(target, logits.shape[1]).bool()
    return logits[keep].view(len(logits), logits.shape[1] - 1)


def target_vs_rest_logits(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, C) -> (B, 2) logits whose softmax at `temperature` is (p_target, 1 - p_target) of softmax(logits / T):
    the target's own logit and T * logsumexp(others / T). So TCKD is the one KD loss on these two, and it stays
    finite where log(1 - p_target) of a near-certain model would not."""
    logits = logits.float()
    own = logits.gather(1, target[:, None])
    rest = temperature * torch.logsumexp(non_target_logits(logits, target) / temperature, dim=1, keepdim=True)
    return torch.cat([own, rest], dim=1)


def decoupled_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 temperature: float) -> dict[str, torch.Tensor]:
    """{"tckd", "nckd"}, each T^2 * KL(teacher || student), mean over samples, unweighted."""
    return {
        "tckd": kd_loss(target_vs_rest_logits(student_logits, target, temperature),
                        target_vs_rest_logits(teacher_logits, target, temperature), temperature),
        "nckd": kd_loss(non_target_logits(student_logits, target), non_target_logits(teacher_logits, target),
                        temperature),
    }


def warmup_factor(epoch: int | None, warmup_epochs: int) -> float:
    """min((epoch + 1) / warmup_epochs, 1); 1 outside the engine (no epoch known) or without a warm-up."""
    if epoch is None or warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


class DKD(Method):
    name = "dkd"
    tasks = ("classification",)
    terms = ("ce", "tckd", "nckd", "_warmup")
    Params = DKDParams
    needs_teacher = True
    pairing = "paired"
    unlabeled = True  # TCKD/NCKD on every sample (the teacher's class for unlabeled ones), CE on the labelled

    def loss(self, batch, out):
        p = self.params
        teacher_logits = self.teacher_outputs(batch, "teacher_image")["teacher"]["logits"]
        labels = batch["label"]
        target = torch.where(labels >= 0, labels, teacher_logits.argmax(1))
        parts = decoupled_kd(out["logits"], teacher_logits, target, p.temperature)
        ramp = warmup_factor(self.__dict__.get("epoch"), p.warmup_epochs)
        return {
            "ce": p.ce_weight * labelled_cross_entropy(out["logits"], labels),
            "tckd": ramp * p.alpha * parts["tckd"],
            "nckd": ramp * p.beta * parts["nckd"],
            "_warmup": torch.tensor(ramp, device=out["logits"].device),
        }
