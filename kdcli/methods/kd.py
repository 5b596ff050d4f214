"""Hinton et al. 2015: CE + weight * T^2 * KL(teacher_T || student_T), teacher on the paired image.

Unlabeled paired samples (label -1, `prepare` reads them from the raw download's unlabeled lists) take part in
the KL term only: the teacher labels, through its modality, what the raters never did (Lopez-Paz et al. 2016:
the strongest lever of cross-modal distillation). `distill --no-unlabeled` leaves them out."""

from __future__ import annotations

import dataclasses

from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss, labelled_cross_entropy


@dataclasses.dataclass
class KDParams:
    temperature: float = dataclasses.field(default=4.0, metadata={"help": "softmax temperature T"})
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the T^2-scaled KL term"})
    ce_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the hard-label CE"})


class HintonKD(Method):
    name = "kd"
    tasks = ("classification",)
    terms = ("ce", "kd")
    Params = KDParams
    needs_teacher = True
    pairing = "paired"
    unlabeled = True  # the KD term on every sample, labelled or not; CE on the labelled ones

    def loss(self, batch, out):
        teacher_logits = self.teacher_outputs(batch, "teacher_image")["teacher"]["logits"]
        return {
            "ce": self.params.ce_weight * labelled_cross_entropy(out["logits"], batch["label"]),
            "kd": self.params.kd_weight * kd_loss(out["logits"], teacher_logits, self.params.temperature),
        }
