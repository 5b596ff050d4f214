"""Attention MIL over slide patches, with a clinical branch: the models of WSI + clinical ALN prediction.

    patch encoder   timm backbone (normalisation inside), shared by both branches (one encoder pass per patch: a
                    second encoder would double every step's cost); or none, when the model reads patch
                    embeddings cached by `kdcli embed` (spec["embeddings"])
    WSI branches    gated attention pooling (Ilse et al. 2018) -> h_w; one per branch: "mm" (the multi-modal
                    branch's WSI features) and "sm" (the WSI-only branch's), each with its own patch projection
                    (Linear -> ReLU, the space h_w lives in) and its own attention. No further per-branch layer
                    between encoder and pooling: a Linear there would compose with the projection's Linear into
                    one linear map. What makes the branches differ is how a student is initialised
                    (Bidirectional.make_student: the WSI-only pooling fresh, not copied)
    clinical MLP    [values * observed, observed] -> h_c: a missing value is zero with its indicator at zero
    heads           fusion [h_w^mm, h_c] -> z_mm; WSI-only h_w^sm -> z_sm

`branches` says which exist: ["sm"] (a WSI-only model), ["mm"] (WSI + clinical), ["mm", "sm"] (bidirectional).
`logits` routes per slide: z_mm where the clinical record is present (or no WSI-only head exists), else z_sm.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from kdcli.models.classifier import default_normalisation


class GatedAttention(nn.Module):
    def __init__(self, features: int, hidden: int, dropout: float):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.value, self.gate = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, patches: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, F) features, (B, K) mask -> (B, hidden) pooled, (B, K) attention."""
        h = self.project(patches)
        scores = self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))).squeeze(-1)
        attention = scores.float().masked_fill(~mask, float("-inf")).softmax(-1)
        return (attention.unsqueeze(-1).to(h.dtype) * h).sum(1), attention


class MILClassifier(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        mean, std = default_normalisation(3)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        embeddings = spec.get("embeddings")
        if embeddings:  # patches come as cached embeddings (`kdcli embed`): no encoder to train or run
            self.encoder = None
            features = embeddings["dim"]
        else:
            self.encoder = timm.create_model(spec["backbone"], pretrained=False, num_classes=0, in_chans=3)
            features = self.encoder.num_features
        self.feature_map = nn.Identity()  # Grad-CAM's target on single patches, as for every classifier
        hidden, classes = spec["hidden"], spec["num_classes"]
        self.pool = nn.ModuleDict({b: GatedAttention(features, hidden, spec.get("dropout", 0.25))
                                   for b in spec["branches"]})
        if "mm" in spec["branches"]:
            dims = spec["clinical_dims"]
            # dropout: a few dozen sheet columns on a few hundred patients overfit first (measured on the phantoms)
            rate, width = spec.get("dropout", 0.25), spec["clinical_hidden"]
            self.clinical = nn.Sequential(nn.Dropout(rate), nn.Linear(2 * dims, width), nn.ReLU(), nn.Dropout(rate),
                                          nn.Linear(width, width), nn.ReLU())
            self.head_mm = nn.Linear(hidden + spec["clinical_hidden"], classes)
        if "sm" in spec["branches"]:
            self.head_sm = nn.Linear(hidden, classes)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) uint8 -> (B, K, F) patch features."""
        batch, count = patches.shape[:2]
        images = (patches.flatten(0, 1).float().div_(255.0) - self.mean) / self.std
        feature_map = self.feature_map(self.encoder.forward_features(images))
        return self.encoder.forward_head(feature_map, pre_logits=True).view(batch, count, -1)

    def bag_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, F): the cached embeddings when the model reads them, else the encoded patches."""
        return batch["features"] if self.encoder is None else self.encode(batch["patches"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.bag_features(batch)
        mask = batch["bag_mask"]
        out: dict[str, torch.Tensor] = {}
        for branch, pool in self.pool.items():
            out[f"h_{branch}"], out[f"attention_{branch}"] = pool(features, mask)
        if "sm" in self.pool:
            out["logits_sm"] = self.head_sm(out["h_sm"])
        if "mm" in self.pool:
            values = batch["clinical"] * batch["clinical_mask"]
            out["h_clinical"] = self.clinical(torch.cat([values, batch["clinical_mask"]], -1).to(features.dtype))
            out["logits_mm"] = self.head_mm(torch.cat([out["h_mm"], out["h_clinical"]], -1))
        if "mm" in self.pool and "sm" in self.pool:
            present = batch["clinical_present"].bool().unsqueeze(-1)
            out["logits"] = torch.where(present, out["logits_mm"], out["logits_sm"])
        else:
            out["logits"] = out["logits_mm"] if "mm" in self.pool else out["logits_sm"]
        out["features"] = out.get("h_sm", out.get("h_mm"))
        return out


def mil_spec(backbone: str, num_classes: int, branches: list[str], clinical_dims: int, hidden: int = 128,
             clinical_hidden: int = 32) -> dict[str, Any]:
    return {"arch": "mil", "backbone": backbone, "head": "mil", "in_chans": 3, "num_classes": num_classes,
            "branches": branches, "clinical_dims": clinical_dims, "hidden": hidden,
            "clinical_hidden": clinical_hidden}
