"""SALL, synergic adversarial label learning (Ju et al., IEEE JBHI 2021, arXiv 2003.10607): two sets, each
graded for one disease (DR on one, AMD on the other), teach one two-headed model.

No official code exists ("To Do" in the authors' README); this is our reconstruction from the abstract, every
choice a parameter:
    1. single-task teachers (`kdcli teach --task dr`, `--task amd`) are frozen;
    2. semantic space: each head learns hard labels on its own set and the other teacher's soft labels
       (temperature T) on the other set:  CE(own head, y) + kd_weight * T^2 * KL(teacher_T || head_T);
    3. feature space: a discriminator tells the two sets apart from backbone features; a gradient reversal
       layer (Ganin & Lempitsky 2015) makes the backbone confuse it, aligning the sets:
       adv_weight * CE(D(GRL(f)), set).
Per-batch sums are divided by the batch size, so mixed batches weigh each sample once per head.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss


@dataclasses.dataclass
class SALLParams:
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "soft-label temperature T"})
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the other teacher's soft labels"})
    own_kd_weight: float = dataclasses.field(default=0.0, metadata={"help": "soft labels of a set's own teacher"})
    adv_weight: float = dataclasses.field(default=0.1, metadata={"help": "weight of the adversarial feature term"})
    grl_lambda: float = dataclasses.field(default=1.0, metadata={"help": "gradient reversal strength"})
    disc_hidden: int = dataclasses.field(default=256, metadata={"help": "discriminator hidden width"})


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the given samples (divided by the batch later)."""
    return kd_loss(student_logits, teacher_logits, temperature, reduction="sum")


class SALL(Method):
    name = "sall"
    tasks = ("classification",)
    terms = ("ce", "kd", "own_kd", "adv", "_set_accuracy")
    Params = SALLParams
    needs_teacher = True
    per_task_teachers = True

    def __init__(self, params, student, teacher=None):
        super().__init__(params, student, teacher)
        self.tasks = list(teacher)
        width = student.backbone.num_features
        self.discriminator = nn.Sequential(nn.Linear(width, params.disc_hidden), nn.ReLU(inplace=True),
                                           nn.Linear(params.disc_hidden, len(self.tasks)))

    def loss(self, batch, out):
        labels, sets = batch["label"], batch["task"]
        size = len(labels)
        soft = {task: teacher_out["logits"] for task, teacher_out in self.teacher_outputs(batch, "image").items()}
        zero = out["features"].sum() * 0.0
        ce, kd, own_kd = zero, zero, zero
        for index, task in enumerate(self.tasks):
            logits, own = out["task_logits"][task], sets == index
            if own.any():
                ce = ce + F.cross_entropy(logits[own], labels[own], reduction="sum")
                if self.params.own_kd_weight:
                    own_kd = own_kd + soft_label_loss(logits[own], soft[task][own], self.params.temperature)
            if (~own).any():
                kd = kd + soft_label_loss(logits[~own], soft[task][~own], self.params.temperature)
        reversed_features = GradientReversal.apply(out["features"], self.params.grl_lambda)
        set_logits = self.discriminator(reversed_features.float())
        return {
            "ce": ce / size,
            "kd": self.params.kd_weight * kd / size,
            "own_kd": self.params.own_kd_weight * own_kd / size,
            "adv": self.params.adv_weight * F.cross_entropy(set_logits, sets),
            "_set_accuracy": (set_logits.argmax(1) == sets).float().mean(),
        }
