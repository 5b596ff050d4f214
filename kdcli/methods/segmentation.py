"""Supervised segmentation (what `teach` runs on a segmentation dataset): ProtoKD's L_seg, a class-weighted
cross-entropy plus a soft Dice over every class, background included.

Pixels of mask -1 (unlabeled slices, see kdcli.data.slices) take no part: neither in the class weights, the CE
mean nor the Dice sums, so they get no gradient from L_seg; a batch without any labelled pixel gives 0 (with a
graph), not NaN. A batch without such pixels computes exactly as before, except that a batch whose labelled
pixels hold a single class (tumour-free slices alone) takes plain CE, where the official class weights are all 0
and give NaN (see weighted_cross_entropy)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method

UNLABELED_PIXEL = -1  # the mask value of pixels nobody labelled (every pixel of an unlabeled slice)


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over classes of 1 - (2 sum(p g) + s) / (sum(g^2) + sum(p^2) + s), sums over the batch's labelled
    pixels (all of them, unless the mask holds -1)."""
    probs = logits.float().softmax(1)
    labelled = mask >= 0
    if not labelled.all():  # unlabeled pixels: out of every sum (their probabilities too)
        probs = probs * labelled[:, None].float()
        truth = F.one_hot(mask.clamp_min(0), probs.shape[1]).permute(0, 3, 1, 2).float() * labelled[:, None].float()
    else:
        truth = F.one_hot(mask, probs.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)
    score = (2 * overlap + smooth) / (truth.pow(2).sum(dims) + probs.pow(2).sum(dims) + smooth)
    return 1 - score.mean()


def weighted_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE with per-batch class weights w_c = 1 - n_c / sum(n): rare classes (enhancing tumour) weigh more. Counts
    and mean over the labelled pixels (mask -1 is ignored). With a single class among them (tumour-free slices
    alone, frequent once unlabeled slices share the batch) the official weights are 0 and the CE 0/0 = NaN:
    plain CE then (a deviation; the official 3-D crops nearly always hold tumour)."""
    labelled = mask >= 0
    counts = torch.bincount(mask[labelled] if not labelled.all() else mask.flatten(), minlength=logits.shape[1])
    weights = 1 - counts.float() / counts.sum().clamp_min(1)
    weights = torch.where((counts > 0).sum() <= 1, torch.ones_like(weights), weights)
    return F.cross_entropy(logits.float(), mask, weight=weights, ignore_index=UNLABELED_PIXEL)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"ce", "dice"} over the labelled pixels; both 0 (differentiable, no gradient) when the batch has none."""
    if not (mask >= 0).any():
        zero = logits.float().sum() * 0.0
        return {"ce": zero, "dice": zero.clone()}
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
