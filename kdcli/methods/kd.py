"""Hinton et al. 2015: CE + weight * T^2 * KL(teacher_T || student_T), teacher on the paired image."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method


@dataclasses.dataclass
class KDParams:
    temperature: float = dataclasses.field(default=4.0, metadata={"help": "softmax temperature T"})
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the T^2-scaled KL term"})
    ce_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the hard-label CE"})


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


class HintonKD(Method):
    name = "kd"
    Params = KDParams
    needs_teacher = True
    pairing = "paired"

    def loss(self, batch, out):
        teacher_logits = self.teacher_outputs(batch, "teacher_image")["teacher"]["logits"]
        return {
            "ce": self.params.ce_weight * F.cross_entropy(out["logits"], batch["label"]),
            "kd": self.params.kd_weight * kd_kl(out["logits"], teacher_logits.float(), self.params.temperature),
        }
