"""Attention-MIL training on slide bags: what `teach` runs on WSI datasets. `--modality wsi` trains the
WSI-only branch; `--modality wsi,clinical` the fusion branch (the naive multi-modal model: at test a missing
clinical record is zero-filled)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdcli.methods.base import Method


@dataclasses.dataclass
class MILParams:
    clinical_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "probability of hiding a slide's clinical record during training (fusion branch)"})


def drop_clinical(batch: dict, probability: float, training: bool) -> dict:
    """Hide whole clinical records at random (zero values, zero indicators), as missing ones look at test."""
    if not training or probability <= 0:
        return batch
    keep = (torch.rand(batch["clinical"].shape[0], device=batch["clinical"].device) >= probability)
    keep = keep.unsqueeze(-1).to(batch["clinical"].dtype)
    return {**batch, "clinical": batch["clinical"] * keep, "clinical_mask": batch["clinical_mask"] * keep,
            "clinical_present": batch["clinical_present"] & keep.squeeze(-1).bool()}


class MIL(Method):
    name = "mil"
    tasks = ("mil",)
    terms = ("ce",)
    Params = MILParams

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.run_student(drop_clinical(batch, self.params.clinical_dropout, self.training))
        return {"ce": F.cross_entropy(out["logits"].float(), batch["label"])}
