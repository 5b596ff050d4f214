"""The stage-2 model of coarse-to-fine CXR classification (van Sonsbeek et al., WACV 2023), shaped after the
group's released VKD code since the paper's own code is not public:

    prior      p(z | x)    = N(mu_p, sigma_p)  from the pooled image features and the features pooled under an
                                              attention map the prior predicts itself (VKD's prior mixes the
                                              7x7 positions with a learned layer): the KL term teaches it
                                              where the annotation would have pointed
    posterior  q(z | x, a) = N(mu_q, sigma_q)  from the pooled features and the features pooled under the
                                              annotation map a (gaze heat map or box mask)
    heads      y_p = W_p [z_p, f],  y_q = W_q z_q   (spec["head_input"] = "z", new students)
               y_p = W_p [z_p, f],  y_q = W_q [z_q, f]   ("zf": students built before the option, and on request)
    z = mean of `samples` reparameterised draws (VKD: 100)

Why the posterior head reads z_q alone ("z"): it is VKD's `generation(z_r)`. With [z_q, f] and the stage-1
head as its start (z weights at zero), the posterior classified from f, dL/dz_q was exactly 0 at the first step,
nothing forced the annotation's information into z_q, and so the KL had nothing to hand the prior: the
posterior could never be better than the prior. Reading z_q only, its sole route to the logits is z_q.
Why the prior head keeps reading [z_p, f]: it is VKD's `generation_p([z_p, out_p])`, the network its `testing()`
runs (the test path does not read z alone in VKD either), and it lets the prior start as the stage-1 head (f
weights copied, z weights at zero): at epoch 0 the test-time path is exactly stage 1, so stage 2 can only be
judged against what it starts from. Its z weights get a gradient from the first step (dL/dW_z = dL/dy z_p) and
grow as far as the KL-matched z_p helps the prior's BCE. The posterior head is a fresh linear layer (PyTorch's
default initialisation, the stage-1 bias): with zero weights dL/dz_q would again be 0.

At test time only the prior path runs (no annotation needed): `logits` is y_p with z_p = mu_p.
`spec["posterior_detached"]` (old students: true) cuts the posterior off the backbone; new students by default
let the posterior's BCE train the trainable block, so the annotation reaches the features the prior reads too.
The backbone is the stage-1 classifier's; `freeze_backbone` keeps all but its last `train_last` blocks fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.classifier import Classifier

HEAD_INPUTS = ("z", "zf")


def gaussian_head(in_features: int, hidden: int, latent: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.5),
                         nn.Linear(hidden, 2 * latent))


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, samples: int) -> torch.Tensor:
    std = (0.5 * logvar).exp()
    draws = mu[None] + std[None] * torch.randn((samples, *mu.shape), device=mu.device, dtype=mu.dtype)
    return draws.mean(0)


def head_input(spec: dict[str, Any]) -> str:
    """What the posterior head reads; a spec without the key comes from a student built before the option
    existed, whose posterior head read [z, f] ("zf"), so its weights fit and it behaves as it did."""
    return spec.get("head_input", "zf")


class CVIClassifier(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        if head_input(spec) not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got {head_input(spec)!r}")
        self.base = Classifier(spec["classifier"])
        self.feature_map = self.base.feature_map  # Grad-CAM's target, as for every classifier
        features, latent, classes = self.base.backbone.num_features, spec["latent"], spec["classifier"]["num_classes"]
        self.prior_attention = nn.Conv2d(features, 1, 1)
        self.prior = gaussian_head(2 * features, spec["hidden"], latent)
        self.posterior = gaussian_head(2 * features, spec["hidden"], latent)
        self.head_prior = nn.Linear(latent + features, classes)
        self.posterior_reads_features = head_input(spec) == "zf"
        self.head_posterior = nn.Linear(latent + (features if self.posterior_reads_features else 0), classes)
        self.frozen: list[nn.Module] = []

    def start_from(self, stage1: Classifier) -> None:
        """Stage-1 weights. The prior head starts as stage 1's linear head on f with its z part at zero, so the
        test-time path at epoch 0 is stage 1; a [z, f] posterior head starts so too, a z-only one keeps its
        random weights (zero weights would give z_q no gradient) and takes stage 1's bias."""
        self.base.load_state_dict(stage1.state_dict())
        features = self.base.backbone.num_features
        heads = (self.head_prior, self.head_posterior) if self.posterior_reads_features else (self.head_prior,)
        with torch.no_grad():
            for head in heads:
                head.weight.zero_()
                head.weight[:, -features:].copy_(stage1.head.weight)
                head.bias.copy_(stage1.head.bias)
            if not self.posterior_reads_features:
                self.head_posterior.bias.copy_(stage1.head.bias)

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
            read = torch.cat([z_q.to(pooled.dtype), pooled], -1) if self.posterior_reads_features else z_q
            out.update(posterior_logits=self.head_posterior(read.to(pooled.dtype)), mu_q=mu_q, logvar_q=logvar_q)
        return out
