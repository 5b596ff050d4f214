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

Unlabeled slides (label -1: `prepare camelyon` rows without an ALN status; drawn `distill --unlabeled-ratio`
per labelled slide, left out with `--no-unlabeled`): both CE terms leave them out; the distillation terms read
them, as they need no label: the multi-modal branch (the fusion teacher's weights, its clinical record present)
labels them for the WSI-only branch through kd, and the alignment pulls its WSI features toward the WSI-only
ones. The record is what the unlabeled slides keep, so the teacher labels them through the modality the student
lacks. Logged, not summed: `_unlabeled`, the share of the batch's slides that are unlabeled.

The student starts from the multi-modal teacher (`--teacher mm.pt`); the teacher itself is not used afterwards.
    shared patch encoder, clinical MLP, the multi-modal WSI pooling and the fusion head: copied, so the
        multi-modal branch starts as the teacher (its logits are the teacher's)
    WSI-only pooling (its own patch projection and gated attention) and head: freshly initialised, seeded by --seed
Why: until issue 13 the WSI-only pooling was a copy of the multi-modal one while the encoder is shared, so
h_w^sm == h_w^mm at the start (|delta|max 0, align 0, its gradient ~1e-7: 1 - cos is flat at equal vectors) and the
sm -> mm term aligned the multi-modal branch to itself; the align logged in training (~0.04 on the phantoms) was
mostly the two branches' different dropout masks (0.029 in train mode at the start, 0 in eval mode). The WSI-only
branch's features have to be its own, learned from the slide alone, for the alignment to pass anything on.
Rejected: copying the projection and the fusion head's WSI columns and only re-initialising the attention (so
z_sm would start sensible): a fresh attention pools nearly uniformly, and so do the phantom teachers (largest
weight 1.007x uniform), so h_sm stayed equal to h_mm (align 1e-7, |delta|max 4e-4 on the demo's teacher). Starting
the WSI-only head from the fusion head's WSI columns is rejected with it: those columns read h_w^mm's coordinates,
and on a fresh pooling's features they are as arbitrary as a fresh head. The cost: at the first step the alignment
dominates the multi-modal branch (align 0.65, its gradient on that pooling 15x that of CE(z_mm) on the demo's
teacher), pulling it toward features still being learned; `-p align_weight=` damps that.
No extra per-branch projection layer: each branch already has its own projection inside its pooling, and a Linear
before it would compose with that Linear into one linear map. Checkpoints keep the same layout; only a new
student's start changed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.errors import UsageError
from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss, labelled_cross_entropy
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
    terms = ("ce_mm", "ce_sm", "kd", "align", "_unlabeled")
    Params = BidirectionalParams
    needs_teacher = True
    uses_teacher_outputs = False
    unlabeled = True  # kd and align on every slide, labelled or not; the CE terms on the labelled ones

    @classmethod
    def make_student(cls, params: BidirectionalParams, teacher: torch.nn.Module) -> torch.nn.Module:
        from kdcli.models.mil import MILClassifier

        if teacher.spec.get("arch") != "mil" or "mm" not in teacher.spec["branches"]:
            raise UsageError("--method bidirectional needs a WSI + clinical teacher (teach --modality wsi,clinical)")
        # every layer freshly initialised (seeded by the caller), then the teacher's parts copied over
        student = MILClassifier({**teacher.spec, "branches": ["mm", "sm"]})
        own = ("pool.sm.", "head_sm.")  # the WSI-only branch stays fresh, whatever the teacher holds
        student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith(own)},
                                strict=False)
        return student

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        p = self.params
        out = self.run_student(drop_clinical(batch, p.clinical_dropout, self.training))
        labels = batch["label"]
        return {
            "ce_mm": labelled_cross_entropy(out["logits_mm"].float(), labels),
            "ce_sm": p.sm_weight * labelled_cross_entropy(out["logits_sm"].float(), labels),
            "kd": p.kd_weight * kd_loss(out["logits_sm"], out["logits_mm"], p.temperature, dim=-1),
            "align": p.align_weight * (1 - F.cosine_similarity(out["h_mm"].float(), out["h_sm"].detach().float(),
                                                               dim=-1)).mean(),
            "_unlabeled": (labels < 0).float().mean(),
        }
