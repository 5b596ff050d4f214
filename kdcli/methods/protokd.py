"""ProtoKD (Wang et al., ICASSP 2023): a frozen multi-sequence teacher distilled into a one-sequence
segmentation student, as in the official code (`code/loss.py`, `trainer.py`):

    L = L_seg + kd_weight * L_kd + proto_weight * L_proto
    L_kd    = mean over (N, C, H, W) of KL(softmax(z_t / T) || softmax(z_s / T)), T = 10, no T^2 factor
    L_proto = mean over (N, K, H, W) of (M_s - M_t)^2, where M_k(v) = cos(F_v, P_k) and the prototype P_k is
              the mean of one sample's last decoder features F over the ground-truth pixels of class k, for
              the classes present in every sample of the batch (others are skipped, as the official code does)

The teacher sees its sequences of the same slice (flipped identically); the student its one sequence.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss
from kdcli.methods.segmentation import segmentation_loss


@dataclasses.dataclass
class ProtoKDParams:
    kd_weight: float = dataclasses.field(default=10.0, metadata={"help": "weight of the pixel-wise KL term"})
    temperature: float = dataclasses.field(default=10.0, metadata={"help": "softmax temperature (no T^2 factor)"})
    proto_weight: float = dataclasses.field(default=0.1, metadata={"help": "weight of the prototype-map MSE"})
    seg_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of CE + soft Dice on labels"})


def pixel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official voxel-wise KL: mean over (N, C, H, W), no T^2 factor."""
    return kd_loss(student_logits, teacher_logits, temperature, t_squared=False, reduction="mean")


def shared_classes(mask: torch.Tensor, num_classes: int) -> list[int]:
    """Classes that occur in every sample of the batch."""
    present = F.one_hot(mask.flatten(1), num_classes).amax(1).bool()  # (N, C)
    return [int(c) for c in torch.nonzero(present.all(0)).flatten()]


def similarity_maps(features: torch.Tensor, mask: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """(N, K, H, W): cosine between each pixel's features and the sample's prototype of each class."""
    if features.shape[-2:] != mask.shape[-2:]:
        features = F.interpolate(features, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    features = features.float()
    onehot = torch.stack([(mask == c) for c in classes], 1).float()  # (N, K, H, W)
    prototypes = torch.einsum("nkhw,nchw->nkc", onehot, features) / (onehot.sum((2, 3))[..., None] + 1e-5)
    return F.cosine_similarity(features[:, None], prototypes[..., None, None], dim=2, eps=1e-8)


def prototype_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, mask: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    classes = shared_classes(mask, num_classes)
    if not classes:
        return student_features.sum() * 0.0
    student_maps = similarity_maps(student_features, mask, classes)
    teacher_maps = similarity_maps(teacher_features, mask, classes)
    return (student_maps - teacher_maps).pow(2).mean()


class ProtoKD(Method):
    name = "protokd"
    tasks = ("segmentation",)
    terms = ("ce", "dice", "kd", "proto")
    Params = ProtoKDParams
    needs_teacher = True
    pairing = "paired"

    def loss(self, batch, out):
        teacher = self.teacher_outputs(batch, "teacher_image")["teacher"]
        p = self.params
        terms = {k: p.seg_weight * v for k, v in segmentation_loss(out["logits"], batch["mask"]).items()}
        terms["kd"] = p.kd_weight * pixel_kd(out["logits"], teacher["logits"], p.temperature)
        terms["proto"] = p.proto_weight * prototype_loss(out["features"], teacher["features"], batch["mask"],
                                                         out["logits"].shape[1])
        return terms
