"""Multi-label training (chest X-ray findings): binary cross-entropy per label, unknown labels (255) left out.
What `teach` runs on a multi-label dataset, and stage 1 of the coarse-to-fine CXR method."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method
from kdcli.metrics.classification import IGNORE


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    known = labels != IGNORE
    targets = torch.where(known, labels, torch.zeros_like(labels)).float()
    weight = torch.as_tensor(pos_weight, device=logits.device) if pos_weight != 1.0 else None
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none", pos_weight=weight)
    return (loss * known).sum() / known.sum().clamp_min(1)


@dataclasses.dataclass
class MultiLabelParams:
    pos_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of positive labels in the BCE"})


class MultiLabel(Method):
    name = "multilabel"
    tasks = ("multilabel",)
    terms = ("bce",)
    Params = MultiLabelParams

    def loss(self, batch, out):
        return {"bce": masked_bce(out["logits"], batch["labels"], self.params.pos_weight)}
