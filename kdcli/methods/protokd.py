"""ProtoKD (Wang et al., ICASSP 2023): a frozen multi-sequence teacher distilled into a one-sequence
segmentation student, as in the official code (`code/loss.py`, `trainer.py`) except for which (sample, class)
pairs the prototype term covers:

    L = L_seg + kd_weight * L_kd + proto_weight * L_proto
    L_kd    = mean over (N, C, H, W) of KL(softmax(z_t / T) || softmax(z_s / T)), T = 10, no T^2 factor
    L_proto = mean over the chosen (sample, class) pairs of the mean over (H, W) of (M_s - M_t)^2, where
              M_k(v) = cos(F_v, P_k) and the prototype P_k is the mean of one sample's last decoder features F
              over its ground-truth pixels of class k, computed separately from student and teacher features

Which pairs (`prototype_classes`):
- "per_sample" (default, a deviation): each sample with every class present in its own ground-truth mask.
- "shared" (the official rule): every sample with the classes present in every sample of the batch; the mean
  over pairs is then the official mean over (N, K, H, W).
The official code trains 3-D 96x128x128 crops at batch 4, where most crops hold tumour. On 2-D slices with
tumour-free slices kept, a batch of 32 nearly always holds one slice without tumour, so the official rule keeps
background alone and the prototype term never sees a tumour class (issue 13: background alone in 100% of 2,000
random batches of 32, 91% at 8, 71% at 4; on a 12-case 64-px phantom, 98 of 138 train slices with tumour: 100%,
94%, 76%). Per sample, every slice with tumour contributes its tumour prototypes (tumour in 100% of batches of
32 there, 54% of the pairs).
Logged, not summed: `_proto_tumour_batches` (1 when a tumour class, any class but 0, is in the batch's pairs;
its epoch mean is the share of such batches) and `_proto_tumour_pairs` (the share of the batch's pairs whose
class is a tumour class, averaged over batches).

Unlabeled slices (cases of `prepare brats --unlabeled`, e.g. BraTS validation data; mask -1, label -1; drawn
`distill --unlabeled-ratio` per labelled slice, left out with `--no-unlabeled`): L_seg leaves them out (no
gradient from it), L_kd covers them like every slice, and L_proto builds their prototypes, for the student's and
the teacher's maps alike, from the teacher's own predicted mask (argmax of its logits) in place of the ground
truth, which they lack; labelled slices keep the ground truth (the official term). Either prototype rule then
reads that mask. Logged, not summed: `_unlabeled`, the share of the batch's slices that are unlabeled.

The teacher sees its sequences of the same slice (flipped identically); the student its one sequence.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.errors import UsageError
from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss
from kdcli.methods.segmentation import segmentation_loss

PROTOTYPE_RULES = ("per_sample", "shared")


@dataclasses.dataclass
class ProtoKDParams:
    kd_weight: float = dataclasses.field(default=10.0, metadata={"help": "weight of the pixel-wise KL term"})
    temperature: float = dataclasses.field(default=10.0, metadata={"help": "softmax temperature (no T^2 factor)"})
    proto_weight: float = dataclasses.field(default=0.1, metadata={"help": "weight of the prototype-map MSE"})
    seg_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of CE + soft Dice on labels"})
    prototype_classes: str = dataclasses.field(default="per_sample", metadata={
        "help": "per_sample: each sample's prototypes of the classes in its own mask; shared: only classes in "
                "every sample of the batch (official; on 2-D slices nearly always background alone)"})

    def __post_init__(self) -> None:
        if self.prototype_classes not in PROTOTYPE_RULES:
            raise UsageError(f"protokd: prototype_classes={self.prototype_classes!r} is not one of "
                             f"{', '.join(PROTOTYPE_RULES)}")


def pixel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official voxel-wise KL: mean over (N, C, H, W), no T^2 factor."""
    return kd_loss(student_logits, teacher_logits, temperature, t_squared=False, reduction="mean")


def class_presence(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) bool: whether class c occurs in sample n's ground-truth mask."""
    return F.one_hot(mask.flatten(1), num_classes).amax(1).bool()


def shared_classes(mask: torch.Tensor, num_classes: int) -> list[int]:
    """Classes that occur in every sample of the batch (the official rule)."""
    return [int(c) for c in torch.nonzero(class_presence(mask, num_classes).all(0)).flatten()]


def prototype_pairs(mask: torch.Tensor, num_classes: int, rule: str = "per_sample") -> torch.Tensor:
    """(N, C) bool: the (sample, class) pairs the prototype term covers under `rule` (see the module doc)."""
    present = class_presence(mask, num_classes)
    if rule == "per_sample":
        return present
    if rule == "shared":
        return present.all(0, keepdim=True).expand_as(present)
    raise UsageError(f"protokd: prototype_classes={rule!r} is not one of {', '.join(PROTOTYPE_RULES)}")


def similarity_maps(features: torch.Tensor, mask: torch.Tensor, num_classes: int,
                    eps: float = 1e-8) -> torch.Tensor:
    """(N, C, H, W): cosine between each pixel's features and the sample's prototype of each class (the mean
    feature over its ground-truth pixels of that class; a zero vector, hence a zero map, for an absent class)."""
    if features.shape[-2:] != mask.shape[-2:]:
        features = F.interpolate(features, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    features = features.float()
    onehot = F.one_hot(mask, num_classes).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    prototypes = torch.einsum("nkhw,nfhw->nkf", onehot, features) / (onehot.sum((2, 3))[..., None] + 1e-5)
    # cos = <F_v, P_k> / (max(|F_v|, eps) max(|P_k|, eps)), as F.cosine_similarity, without its (N, C, F, H, W)
    # broadcast: one einsum for the dot products of every class
    dots = torch.einsum("nfhw,nkf->nkhw", features, prototypes)
    pixel_norms = features.norm(dim=1, keepdim=True).clamp_min(eps)  # (N, 1, H, W)
    prototype_norms = prototypes.norm(dim=2).clamp_min(eps)[..., None, None]  # (N, C, 1, 1)
    return dots / (pixel_norms * prototype_norms)


def prototype_mask(mask: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The mask the prototypes are built from: the ground truth where there is one, the teacher's argmax where the
    mask is -1 (unlabeled slices)."""
    if teacher_logits.shape[-2:] != mask.shape[-2:]:
        teacher_logits = F.interpolate(teacher_logits.float(), size=mask.shape[-2:], mode="bilinear",
                                       align_corners=False)
    return torch.where(mask < 0, teacher_logits.detach().argmax(1), mask)


def prototype_terms(student_features: torch.Tensor, teacher_features: torch.Tensor, mask: torch.Tensor,
                    num_classes: int, rule: str = "per_sample") -> dict[str, torch.Tensor]:
    """{"proto": mean over the rule's pairs of the pixel-mean (M_s - M_t)^2 (zero, still differentiable, when
    there are none), "_proto_tumour_batches", "_proto_tumour_pairs"}. The teacher's maps are targets: no
    gradient reaches its features."""
    pairs = prototype_pairs(mask, num_classes, rule)
    student_maps = similarity_maps(student_features, mask, num_classes)
    teacher_maps = similarity_maps(teacher_features.detach(), mask, num_classes)
    pair_errors = (student_maps - teacher_maps).pow(2).mean((2, 3))  # (N, C)
    weights = pairs.float()
    count = weights.sum()
    tumour_pairs = weights[:, 1:].sum()  # class 0 is background
    # no .item(): the counts stay on the device, so a training step never waits for the GPU here
    return {"proto": (pair_errors * weights).sum() / count.clamp_min(1.0),
            "_proto_tumour_batches": (tumour_pairs > 0).float(),
            "_proto_tumour_pairs": tumour_pairs / count.clamp_min(1.0)}


def prototype_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, mask: torch.Tensor,
                   num_classes: int, rule: str = "per_sample") -> torch.Tensor:
    return prototype_terms(student_features, teacher_features, mask, num_classes, rule)["proto"]


class ProtoKD(Method):
    name = "protokd"
    tasks = ("segmentation",)
    terms = ("ce", "dice", "kd", "proto", "_proto_tumour_batches", "_proto_tumour_pairs", "_unlabeled")
    Params = ProtoKDParams
    needs_teacher = True
    pairing = "paired"
    unlabeled = True  # L_kd and L_proto (on the teacher's mask) on unlabeled slices; L_seg on labelled ones

    def loss(self, batch, out):
        teacher = self.teacher_outputs(batch, "teacher_image")["teacher"]
        p = self.params
        terms = {k: p.seg_weight * v for k, v in segmentation_loss(out["logits"], batch["mask"]).items()}
        terms["kd"] = p.kd_weight * pixel_kd(out["logits"], teacher["logits"], p.temperature)
        proto = prototype_terms(out["features"], teacher["features"], prototype_mask(batch["mask"], teacher["logits"]),
                                out["logits"].shape[1], p.prototype_classes)
        terms["proto"] = p.proto_weight * proto.pop("proto")
        terms.update(proto)
        # an unlabeled slice: a mask of -1 everywhere (read from the mask, which every batch carries)
        terms["_unlabeled"] = (batch["mask"].flatten(1) < 0).all(1).float().mean()
        return terms
