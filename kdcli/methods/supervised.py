"""Plain supervised training on one modality: what `kdcli teach` runs, and every baseline."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from kdcli.methods.base import Method


@dataclasses.dataclass
class SupervisedParams:
    label_smoothing: float = dataclasses.field(default=0.0, metadata={"help": "cross-entropy smoothing"})


class Supervised(Method):
    name = "supervised"
    tasks = ("classification",)
    terms = ("ce",)
    Params = SupervisedParams

    def loss(self, batch, out):
        return {"ce": F.cross_entropy(out["logits"], batch["label"], label_smoothing=self.params.label_smoothing)}
