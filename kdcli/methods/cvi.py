"""Coarse-to-fine CXR classification, stage 2 (van Sonsbeek et al., WACV 2023): conditional-variational
distillation of gaze/box annotations into the image-only prior path, lower layers frozen.

No official code exists; the losses follow the group's VKD code (IPMI 2021) with these documented choices:
    L = BCE(y_p, y) + BCE(y_q, y)[annotated] + kl_weight * beta_t * KL(q(z|x,a) || p(z|x))[annotated]
    beta_t: cyclical linear annealing over training (VKD: 4 cycles, ratio 0.5), weight 1e-3 (VKD's)
    KL(q || p), the conditional-VAE direction the issue asks for (VKD's code writes KL(p || q)); by default
      the posterior side carries no gradient through it (`detach_posterior`): the posterior is the teacher,
      and with a gradient it collapsed onto the prior within an epoch on the phantoms
    BCE on y_p uses every sample (the global labels), the posterior terms only annotated ones
      (`-p annotated_only=true` trains on the annotated subset alone)
    the prior pools the features under an attention map of its own besides the global pool, so matching the
      posterior (which pools under the annotation) can teach it where to look
    the student starts as the stage-1 model (`--teacher stage1.pt`), all but its last `train_last` backbone
      blocks frozen; at test time the prior path alone gives the logits.
"""

from __future__ import annotations

import dataclasses

import torch

from kdcli.methods.base import Method
from kdcli.methods.multilabel import masked_bce


@dataclasses.dataclass
class CVIParams:
    kl_weight: float = dataclasses.field(default=1e-3, metadata={"help": "weight of KL(q||p) (VKD: 1e-3)"})
    kl_cycles: int = dataclasses.field(default=4, metadata={"help": "cyclical annealing cycles over training"})
    kl_ratio: float = dataclasses.field(default=0.5, metadata={"help": "fraction of a cycle spent rising"})
    posterior_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the posterior BCE"})
    latent: int = dataclasses.field(default=64, metadata={"help": "latent dimensions of z"})
    hidden: int = dataclasses.field(default=256, metadata={"help": "hidden units of the prior/posterior MLPs"})
    samples: int = dataclasses.field(default=100, metadata={"help": "reparameterised draws averaged (VKD: 100)"})
    train_last: int = dataclasses.field(default=1, metadata={"help": "backbone blocks left trainable"})
    annotation: str = dataclasses.field(default="gaze", metadata={"help": "gaze, boxes or both (pixel max)"})
    annotated_only: bool = dataclasses.field(default=False, metadata={"help": "train on the annotated subset only"})
    detach_posterior: bool = dataclasses.field(default=True, metadata={
        "help": "the KL teaches the prior only (the posterior is the teacher: no pull toward the prior)"})
    posterior_to_backbone: bool = dataclasses.field(default=False, metadata={
        "help": "let the posterior's BCE train the backbone's trainable block too"})
    attention_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "weight of a direct term pulling the prior's attention map toward the annotation map (not in "
                "the paper; 0 = off)"})


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                 logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over latent dimensions, per sample."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


def cyclical_beta(progress: float, cycles: int, ratio: float) -> float:
    phase = (progress * cycles) % 1.0
    return min(1.0, phase / ratio) if ratio > 0 else 1.0


class CVI(Method):
    name = "cvi"
    tasks = ("multilabel",)
    terms = ("bce_prior", "bce_posterior", "kl", "_kl_raw", "attention")
    Params = CVIParams
    needs_teacher = True
    pairing = "none"
    targets = ("labels", "gaze", "boxes", "annotated")
    uses_teacher_outputs = False

    @classmethod
    def check_data(cls, meta) -> None:
        if not meta.extra.get("annotated_fraction"):
            from kdcli.errors import KdcliError

            raise KdcliError("no training image has gaze or boxes: CVI has nothing to distil",
                             hint="prepare with --gaze DIR and/or --boxes CSV")

    @classmethod
    def make_student(cls, params: CVIParams, teacher: torch.nn.Module) -> torch.nn.Module:
        from kdcli.models.cvi import CVIClassifier

        if teacher.spec.get("head") != "linear":
            from kdcli.errors import UsageError

            raise UsageError("--method cvi needs a stage-1 teacher with a linear head (teach --head linear)")
        spec = {"arch": "cvi", "backbone": teacher.spec["backbone"], "head": "cvi",
                "in_chans": teacher.spec["in_chans"], "classifier": teacher.spec, "latent": params.latent,
                "hidden": params.hidden, "samples": params.samples,
                "posterior_detached": not params.posterior_to_backbone}
        student = CVIClassifier(spec)
        student.start_from(teacher)
        student.spec["frozen"] = student.freeze_backbone(params.train_last)
        return student

    def annotation_map(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        flags = batch["annotated"].bool()
        if self.params.annotation == "gaze":
            return batch["gaze"], flags[:, 0]
        if self.params.annotation == "boxes":
            return batch["boxes"], flags[:, 1]
        return torch.maximum(batch["gaze"], batch["boxes"]), flags.any(1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        annotation, annotated = self.annotation_map(batch)
        out = self.run_student(batch["image"], annotation)
        p, labels = self.params, batch["labels"]
        keep = annotated if p.annotated_only else torch.ones_like(annotated)
        terms = {"bce_prior": masked_bce(out["logits"][keep], labels[keep]) if keep.any()
                 else out["logits"].sum() * 0.0}
        if annotated.any():
            terms["bce_posterior"] = p.posterior_weight * masked_bce(out["posterior_logits"][annotated],
                                                                     labels[annotated])
            mu_q, logvar_q = out["mu_q"][annotated], out["logvar_q"][annotated]
            if p.detach_posterior:
                mu_q, logvar_q = mu_q.detach(), logvar_q.detach()
            kl = kl_gaussians(mu_q, logvar_q, out["mu_p"][annotated], out["logvar_p"][annotated]).mean()
            beta = cyclical_beta(float(self.__dict__.get("progress", 1.0)), p.kl_cycles, p.kl_ratio)
            terms["kl"] = p.kl_weight * beta * kl
            terms["_kl_raw"] = kl.detach()
            if p.attention_weight:  # cross-entropy of the prior's attention under the annotation distribution
                target = out["annotation_weights"][annotated].flatten(1)
                predicted = out["prior_attention"][annotated].flatten(1).clamp_min(1e-8).log()
                terms["attention"] = p.attention_weight * -(target * predicted).sum(-1).mean()
        else:  # keep every parameter in the graph (DDP) without changing the loss
            terms["bce_posterior"] = out["posterior_logits"].sum() * 0.0 + out["mu_q"].sum() * 0.0
        return terms
