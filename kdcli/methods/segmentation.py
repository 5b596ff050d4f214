"""Supervised segmentation (what `teach` runs on a segmentation dataset): ProtoKD's L_seg, a class-weighted
cross-entropy plus a soft Dice over every class, background included."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over classes of 1 - (2 sum(p g) + s) / (sum(g^2) + sum(p^2) + s), sums over the whole batch."""
    probs = logits.float().softmax(1)
    truth = F.one_hot(mask, probs.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)
    score = (2 * overlap + smooth) / (truth.pow(2).sum(dims) + probs.pow(2).sum(dims) + smooth)
    return 1 - score.mean()


def weighted_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE with per-batch class weights w_c = 1 - n_c / sum(n): rare classes (enhancing tumour) weigh more."""
    counts = torch.bincount(mask.flatten(), minlength=logits.shape[1]).float()
    weights = 1 - counts / counts.sum()
    return F.cross_entropy(logits.float(), mask, weight=weights)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ce": weighted_cross_entropy(logits, mask), "dice": soft_dice_loss(logits, mask)}


@dataclasses.dataclass
class SegmentationParams:
    dice_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the soft Dice term"})


class Segmentation(Method):
    name = "segmentation"
    tasks = ("segmentation",)
    terms = ("ce", "dice")
    Params = SegmentationParams

    def loss(self, batch, out):
        terms = segmentation_loss(out["logits"], batch["mask"])
        terms["dice"] = self.params.dice_weight * terms["dice"]
        return terms
