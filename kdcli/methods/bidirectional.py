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

The student starts from the multi-modal teacher (`--teacher mm.pt`); the teacher itself is not used afterwards.
    shared patch encoder, clinical MLP, the multi-modal WSI pooling and the fusion head: copied, so the
        multi-modal branch starts as the teacher (its logits are the teacher's)
    WSI-only pooling: its patch projection (Linear -> ReLU, the coordinates h_w lives in) copied from the
        multi-modal one; its gated attention (value, gate, score) freshly initialised (seeded by --seed)
    WSI-only head: the fusion head's WSI columns and bias, so z_sm starts as the teacher's WSI evidence read
        through the WSI-only branch's own pooling (the clinical columns dropped: there is no record to read)
Why: until issue 13 the WSI-only pooling was a copy of the multi-modal one (and its head a random init) while
the encoder is shared, so h_w^sm == h_w^mm at the start (|delta|max 0, align 0, its gradient ~1e-7: 1 - cos is
flat at equal vectors) and the sm -> mm term aligned the multi-modal branch to itself; the align logged in
training (~0.04 on the phantoms) was mostly the two branches' different dropout masks (0.029 in train mode at the
start, 0 in eval mode). A fresh attention makes the WSI-only branch choose its own patches (what matters when no
clinical record can help) from the first step, while the copied projection and head columns keep h_w^sm in the
teacher's coordinates and z_sm sensible, so the alignment pulls h_w^mm toward a different but meaningful vector.
How different grows with how peaked the teacher's attention is (a fresh attention pools nearly uniformly): on
the phantoms, whose teachers barely peak, the eval-mode align starts at 1e-5 to 2e-3 with a gradient of 0.02 to
0.2 on the multi-modal branch. A wholly fresh WSI-only pooling (align ~0.5 at the start) would instead pull the
trained multi-modal branch toward untrained features for the first epochs, and leave no sensible start for z_sm.
No extra per-branch projection layer: each branch already has its own projection inside its pooling, and a
Linear before it would compose with that Linear into one linear map, adding F^2 weights and a spec key for
nothing but a different starting point. Checkpoints keep the same layout; only a new student's start changed.
"""

from __future__ import annotations

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
        # every layer freshly initialised first (seeded by the caller), then the teacher's parts copied over
        student = MILClassifier({**teacher.spec, "branches": ["mm", "sm"]})
        own = ("pool.sm.", "head_sm.")  # the WSI-only branch is initialised below whatever the teacher holds
        student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith(own)},
                                strict=False)
        student.pool["sm"].project.load_state_dict(teacher.pool["mm"].project.state_dict())
        hidden = teacher.spec["hidden"]  # head_mm reads cat([h_w^mm, h_c]): its first `hidden` columns are WSI
        with torch.no_grad():
            student.head_sm.weight.copy_(teacher.head_mm.weight[:, :hidden])
            student.head_sm.bias.copy_(teacher.head_mm.bias)
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
