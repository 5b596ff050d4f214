"""The stage-2 model of coarse-to-fine CXR classification (van Sonsbeek et al., WACV 2023), shaped after the
group's released VKD code since the paper's own code is not public:

    prior      p(z | x)    = N(mu_p, sigma_p)  from the pooled image features and the features pooled under an
                                              attention map the prior predicts itself (VKD's prior mixes the
                                              7x7 positions with a learned layer): the KL term teaches it
                                              where the annotation would have pointed
    posterior  q(z | x, a) = N(mu_q, sigma_q)  from the pooled features and the features pooled under the
                                              annotation map a (gaze heat map or box mask)
    heads      y_p = W_p [z_p, f],  y_q = W_q [z_q, f];  z = mean of `samples` reparameterised draws (VKD: 100)

At test time only the prior path runs (no annotation needed): `logits` is y_p with z_p = mu_p.
The backbone is the stage-1 classifier's; `freeze_backbone` keeps all but its last `train_last` blocks fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.classifier import Classifier


def gaussian_head(in_features: int, hidden: int, latent: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.5),
                         nn.Linear(hidden, 2 * latent))


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, samples: int) -> torch.Tensor:
    std = (0.5 * logvar).exp()
    draws = mu[None] + std[None] * torch.randn((samples, *mu.shape), device=mu.device, dtype=mu.dtype)
    return draws.mean(0)


class CVIClassifier(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.base = Classifier(spec["classifier"])
        self.feature_map = self.base.feature_map  # Grad-CAM's target, as for every classifier
        features, latent, classes = self.base.backbone.num_features, spec["latent"], spec["classifier"]["num_classes"]
        self.prior_attention = nn.Conv2d(features, 1, 1)
        self.prior = gaussian_head(2 * features, spec["hidden"], latent)
        self.posterior = gaussian_head(2 * features, spec["hidden"], latent)
        self.head_prior = nn.Linear(latent + features, classes)
        self.head_posterior = nn.Linear(latent + features, classes)
        self.frozen: list[nn.Module] = []

    def start_from(self, stage1: Classifier) -> None:
        """Stage-1 weights; both heads start as its linear head on f (the z part at zero): epoch 0 = stage 1."""
        self.base.load_state_dict(stage1.state_dict())
        features = self.base.backbone.num_features
        for head in (self.head_prior, self.head_posterior):
            with torch.no_grad():
                head.weight.zero_()
                head.weight[:, -features:].copy_(stage1.head.weight)
                head.bias.copy_(stage1.head.bias)

    def freeze_backbone(self, train_last: int) -> list[str]:
        """Freeze the backbone's top-level blocks except the last `train_last` that hold parameters."""
        blocks = [(name, m) for name, m in self.base.backbone.named_children() if any(True for _ in m.parameters())]
        frozen = blocks[: max(0, len(blocks) - train_last)]
        for _, module in frozen:
            module.requires_grad_(False)
        self.frozen = [m for _, m in frozen]
        return [name for name, _ in frozen]

    def train(self, mode: bool = True) -> CVIClassifier:
        super().train(mode)
        for module in self.frozen:  # frozen blocks keep their BatchNorm statistics too
            module.eval()
        return self

    def forward(self, images: torch.Tensor, annotation: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        base = self.base
        feature_map = base.feature_map(base.backbone.forward_features(base.normalise(images)))
        pooled = base.backbone.forward_head(feature_map, pre_logits=True)
        samples = self.spec.get("samples", 100)
        attention = self.prior_attention(feature_map).float().flatten(1).softmax(-1).view_as(feature_map[:, :1])
        looked = (feature_map.float() * attention).sum((2, 3)).to(pooled.dtype)
        mu_p, logvar_p = self.prior(torch.cat([pooled, looked], -1)).float().chunk(2, dim=-1)
        z_p = reparameterise(mu_p, logvar_p, samples) if self.training else mu_p
        out = {"features": pooled, "logits": self.head_prior(torch.cat([z_p.to(pooled.dtype), pooled], -1)),
               "mu_p": mu_p, "logvar_p": logvar_p, "prior_attention": attention}
        if annotation is not None:
            if self.spec.get("posterior_detached"):  # the posterior reads the features without reshaping them
                feature_map, pooled = feature_map.detach(), pooled.detach()
            weights = F.interpolate(annotation.float(), size=feature_map.shape[-2:], mode="area")
            weights = weights / weights.sum((2, 3), keepdim=True).clamp_min(1e-6)
            out["annotation_weights"] = weights
            attended = (feature_map.float() * weights).sum((2, 3)).to(pooled.dtype)
            mu_q, logvar_q = self.posterior(torch.cat([pooled, attended], -1)).float().chunk(2, dim=-1)
            z_q = reparameterise(mu_q, logvar_q, samples) if self.training else mu_q
            out.update(posterior_logits=self.head_posterior(torch.cat([z_q.to(pooled.dtype), pooled], -1)),
                       mu_q=mu_q, logvar_q=logvar_q)
        return out
