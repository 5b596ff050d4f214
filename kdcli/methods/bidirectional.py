"""Bidirectional distillation for a missing clinical modality (Zhang et al. 2024, arXiv 2401.01553):
a multi-modal branch (WSI + clinical) and a WSI-only branch trained together.

No code was released; these are the losses we chose, each weight a parameter:
    L = CE(z_mm) + CE(z_sm)
      + kd_weight * T^2 * KL(softmax(z_mm / T) || softmax(z_sm / T))     mm -> sm: the WSI-only branch learns
                                                                          the multi-modal branch's knowledge
                                                                          (z_mm carries no gradient here)
      + align_weight * (1 - cos(h_w^mm, sg(h_w^sm)))                      sm -> mm: the multi-modal branch's WSI
                                                                          features follow the WSI-only ones,
                                                                          which cannot lean on clinical data
    clinical_dropout hides whole clinical records during training (0 by default: the paper trains on complete
    pairs and meets missing records only at test).
At test each slide goes to z_mm when its clinical record is present and to z_sm when it is not.
The student starts from the multi-modal teacher (`--teacher mm.pt`): encoder, clinical MLP and fusion head
copied, the WSI-only attention copied from the multi-modal one; the teacher itself is not used afterwards.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from kdcli.errors import UsageError
from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss
from kdcli.methods.mil import drop_clinical


@dataclasses.dataclass
class BidirectionalParams:
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the mm -> sm logit KD"})
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "KD temperature (T^2 scaled)"})
    align_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the sm -> mm feature term"})
    sm_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the WSI-only branch's CE"})
    clinical_dropout: float = dataclasses.field(default=0.0, metadata={"help": "hide clinical records in training"})


class Bidirectional(Method):
    name = "bidirectional"
    tasks = ("mil",)
    terms = ("ce_mm", "ce_sm", "kd", "align")
    Params = BidirectionalParams
    needs_teacher = True
    uses_teacher_outputs = False

    @classmethod
    def make_student(cls, params: BidirectionalParams, teacher: torch.nn.Module) -> torch.nn.Module:
        from kdcli.models.mil import MILClassifier

        if teacher.spec.get("arch") != "mil" or "mm" not in teacher.spec["branches"]:
            raise UsageError("--method bidirectional needs a WSI + clinical teacher (teach --modality wsi,clinical)")
        student = MILClassifier({**teacher.spec, "branches": ["mm", "sm"]})
        student.load_state_dict(teacher.state_dict(), strict=False)
        student.pool["sm"].load_state_dict(copy.deepcopy(teacher.pool["mm"].state_dict()))
        return student

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        p = self.params
        out = self.run_student(drop_clinical(batch, p.clinical_dropout, self.training))
        labels = batch["label"]
        return {
            "ce_mm": F.cross_entropy(out["logits_mm"].float(), labels),
            "ce_sm": p.sm_weight * F.cross_entropy(out["logits_sm"].float(), labels),
            "kd": p.kd_weight * kd_loss(out["logits_sm"], out["logits_mm"], p.temperature, dim=-1),
            "align": p.align_weight * (1 - F.cosine_similarity(out["h_mm"].float(), out["h_sm"].detach().float(),
                                                               dim=-1)).mean(),
        }
