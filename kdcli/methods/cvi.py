"""Coarse-to-fine CXR classification, stage 2 (van Sonsbeek et al., WACV 2023): conditional-variational
distillation of gaze/box annotations into the image-only prior path, lower layers frozen.

No official code exists; the losses follow the group's VKD code (IPMI 2021) with these documented choices:
    L = BCE(y_p, y) + BCE(y_q, y) + kl_weight * beta_t * KL(q(z|x,a) || p(z|x)), on the annotated images
    beta_t: cyclical linear annealing over training (VKD: 4 cycles, ratio 0.5), weight 1e-3 (VKD's)
    the KL is averaged over the latent dimensions and the batch, as VKD's `kl_divergence(p, r).mean()`
      (`kl_reduction=mean`): summed over 64 dimensions, VKD's weight 1e-3 would weigh 64x more
      (`kl_reduction=sum` restores that)
    KL(q || p), the conditional-VAE direction the issue asks for (VKD's code writes KL(p || q)); by default
      the posterior side carries no gradient through it (`detach_posterior`): the posterior is the teacher,
      and with a gradient it collapsed onto the prior within an epoch on the phantoms
    the posterior head reads z_q alone (`head_input=z`, VKD's `generation(z_r)`; see kdcli/models/cvi.py):
      its only route to the logits is z_q, so the annotation's information has to enter z_q for the KL to hand
      it to the prior. `head_input=zf` is the earlier [z_q, f] head, which started as the stage-1 head with its
      z weights at zero: it classified from f, dL/dz_q was 0, and the posterior could not beat the prior
    the posterior's BCE trains the backbone's trainable block (`posterior_to_backbone=true`): the features it
      pools under the annotation are not detached, so the annotation shapes the fine layers the prior reads
      too (the paper's "final layers learn the object-level annotations")
    stage 2 trains on the annotated subset (`annotated_only=true`, the paper's stage 2): the training view is
      cut to the images carrying the chosen annotation, so epochs are over that subset; `annotated_only=false`
      trains the prior's BCE on every image and the posterior terms on the annotated ones
    the prior pools the features under an attention map of its own besides the global pool, so matching the
      posterior (which pools under the annotation) can teach it where to look
    the student starts as the stage-1 model (`--teacher stage1.pt`), all but its last `train_last` backbone
      blocks frozen; at test time the prior path alone gives the logits.

Unlabeled images (label -1: `prepare cxr` reads them from the metadata without labels, e.g. MIMIC images outside
the CheXpert-labelled studies; drawn `--unlabeled-ratio` per labelled image, left out with `--no-unlabeled`):
    an unlabeled image WITH the chosen annotation trains KL(q(z|x,a) || p(z|x)) (and the attention term when on):
      the posterior, which reads the gaze, is CVI's teacher, and what it encodes needs no label; the two BCEs
      (the supervised terms) leave it out
    one WITHOUT the annotation trains nothing and is left out of the training view: the only teacher CVI could
      use there is stage 1, an image-only model of the student's own modality (self-training, which the
      theory note shows gains nothing), and CVI keeps no stage-1 outputs to distil (`uses_teacher_outputs`)
Logged, not summed: `_unlabeled`, the share of the batch's images that are unlabeled.

Each epoch the dev report adds the prior's and the posterior's mean AUROC on the dev images with the chosen
annotation (`dev_prior_auroc_annotated`, `dev_posterior_auroc_annotated` in metrics.jsonl; the epoch is still
selected by the prior's `mean_auroc` on all dev images). The posterior sees the annotation: if it never beats
the prior there, the annotations carry nothing the prior could learn from it, and the run says so at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from kdcli.methods.base import Method
from kdcli.methods.multilabel import masked_bce

ANNOTATIONS = ("gaze", "boxes", "both")
KL_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass
class CVIParams:
    kl_weight: float = dataclasses.field(default=1e-3, metadata={"help": "weight of KL(q||p) (VKD: 1e-3)"})
    kl_cycles: int = dataclasses.field(default=4, metadata={"help": "cyclical annealing cycles over training"})
    kl_ratio: float = dataclasses.field(default=0.5, metadata={"help": "fraction of a cycle spent rising"})
    kl_reduction: str = dataclasses.field(default="mean", metadata={
        "help": "KL over the latent dimensions: mean (VKD's) or sum"})
    posterior_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the posterior BCE"})
    latent: int = dataclasses.field(default=64, metadata={"help": "latent dimensions of z"})
    hidden: int = dataclasses.field(default=256, metadata={"help": "hidden units of the prior/posterior MLPs"})
    samples: int = dataclasses.field(default=100, metadata={"help": "reparameterised draws averaged (VKD: 100)"})
    train_last: int = dataclasses.field(default=1, metadata={"help": "backbone blocks left trainable"})
    annotation: str = dataclasses.field(default="gaze", metadata={"help": "gaze, boxes or both (pixel max)"})
    annotated_only: bool = dataclasses.field(default=True, metadata={
        "help": "train on the annotated subset only (the paper's stage 2)"})
    head_input: str = dataclasses.field(default="z", metadata={
        "help": "what the posterior head reads: z (z_q only, VKD's) or zf ([z_q, f])"})
    detach_posterior: bool = dataclasses.field(default=True, metadata={
        "help": "the KL teaches the prior only (the posterior is the teacher: no pull toward the prior)"})
    posterior_to_backbone: bool = dataclasses.field(default=True, metadata={
        "help": "let the posterior's BCE train the backbone's trainable block too (false: detached features)"})
    attention_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "weight of a direct term pulling the prior's attention map toward the annotation map (not in "
                "the paper; 0 = off)"})


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                 logvar_p: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per sample, averaged ("mean", VKD's) or summed over the latent
    dimensions."""
    per_dimension = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1)
    return per_dimension.sum(-1) if reduction == "sum" else per_dimension.mean(-1)


def cyclical_beta(progress: float, cycles: int, ratio: float) -> float:
    phase = (progress * cycles) % 1.0
    return min(1.0, phase / ratio) if ratio > 0 else 1.0


def annotation_map(batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The map the posterior pools under (gaze, boxes or their pixel max) and which images carry it."""
    flags = batch["annotated"].bool()
    if kind == "gaze":
        return batch["gaze"], flags[:, 0]
    if kind == "boxes":
        return batch["boxes"], flags[:, 1]
    return torch.maximum(batch["gaze"], batch["boxes"]), flags.any(1)


def annotated_rows(view: Any, kind: str) -> np.ndarray:
    """Indices of the images of a ModalityView carrying the `kind` annotation (read from the shards' flags)."""
    flags = np.zeros((len(view), 2), dtype=bool)
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(view.shards):
        by_shard.setdefault(shard, []).append(i)
    for shard, items in by_shard.items():
        flags[items] = view.store.read_many(shard, view.indices[items], "annotated").reshape(len(items), 2) > 0
    chosen = {"gaze": flags[:, 0], "boxes": flags[:, 1]}.get(kind, flags.any(1))
    return np.flatnonzero(chosen)


def annotated_validator(dev_set: Any, classes: list[str], engine: Any, kind: str):
    """The multi-label dev metrics of the prior path (what selects the epoch, as for any multi-label model),
    plus the prior's and the posterior's mean AUROC on the dev images carrying the annotation (None when
    there is none, or no label has both outcomes among them). One pass: the prior's logits do not depend on the
    annotation. Under torchrun every rank scores the whole dev split (the same numbers on each)."""
    from kdcli.engine.loop import make_loader, to_device
    from kdcli.metrics.classification import multilabel_metrics

    @torch.no_grad()
    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        model.eval()
        prior, posterior, labels, flags = [], [], [], []
        for batch in make_loader(dev_set, engine, device, None, train=False):
            batch = to_device(batch, device, False)
            annotation, annotated = annotation_map(batch, kind)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(batch["image"], annotation)
            prior.append(out["logits"].float().sigmoid().cpu().numpy())
            posterior.append(out["posterior_logits"].float().sigmoid().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
            flags.append(annotated.cpu().numpy())
        prior_probs, posterior_probs = np.concatenate(prior), np.concatenate(posterior)
        targets, chosen = np.concatenate(labels), np.concatenate(flags)
        metrics = multilabel_metrics(targets, prior_probs, classes)
        metrics["annotated_images"] = int(chosen.sum())
        for name, probs in (("prior", prior_probs), ("posterior", posterior_probs)):
            metrics[f"{name}_auroc_annotated"] = (multilabel_metrics(targets[chosen], probs[chosen], classes)
                                                  ["mean_auroc"] if chosen.any() else None)
        return metrics

    return validate


def annotation_verdict(history: list[dict[str, Any]]) -> list[str]:
    """One line on whether the posterior (which sees the annotation) beat the prior on the annotated dev images
    in any epoch; if it never did, the annotations carry nothing to distil."""
    pairs = [(row.get("dev_posterior_auroc_annotated"), row.get("dev_prior_auroc_annotated")) for row in history]
    pairs = [(q, p) for q, p in pairs if q is not None and p is not None]
    if not pairs:
        if any(row.get("dev_annotated_images") for row in history):
            return ["posterior and prior not compared: no finding has both outcomes among the annotated dev images"]
        return []  # no annotated dev image: said when the validator was built
    better = sum(q > p for q, p in pairs)
    last = f"last epoch {pairs[-1][0]:.3f} vs {pairs[-1][1]:.3f}"
    if not better:
        return [f"warning: the posterior never beat the prior on the annotated dev images (mean AUROC, "
                f"{len(pairs)} epoch(s), {last}): the annotations carry nothing to distil"]
    return [f"the posterior beat the prior on the annotated dev images in {better}/{len(pairs)} epoch(s) "
            f"(mean AUROC, {last})"]


class CVI(Method):
    name = "cvi"
    tasks = ("multilabel",)
    terms = ("bce_prior", "bce_posterior", "kl", "_kl_raw", "attention", "_unlabeled")
    Params = CVIParams
    needs_teacher = True
    pairing = "none"
    targets = ("labels", "gaze", "boxes", "annotated")
    dev_targets = targets  # the validator scores the posterior on the annotated dev images
    uses_teacher_outputs = False
    unlabeled = True  # the KL (and attention) term on unlabeled images with the annotation; BCEs on labelled ones

    @classmethod
    def check_data(cls, meta) -> None:
        if not meta.extra.get("annotated_fraction"):
            from kdcli.errors import KdcliError

            raise KdcliError("no training image has gaze or boxes: CVI has nothing to distil",
                             hint="prepare with --gaze DIR and/or --boxes CSV")

    @classmethod
    def check_params(cls, params: CVIParams) -> None:
        from kdcli.errors import UsageError
        from kdcli.models.cvi import HEAD_INPUTS

        for name, allowed in (("annotation", ANNOTATIONS), ("head_input", HEAD_INPUTS),
                              ("kl_reduction", KL_REDUCTIONS)):
            if getattr(params, name) not in allowed:
                raise UsageError(f"--method cvi: {name}={getattr(params, name)!r}; use {' or '.join(allowed)}")

    @classmethod
    def make_student(cls, params: CVIParams, teacher: torch.nn.Module) -> torch.nn.Module:
        from kdcli.models.cvi import CVIClassifier

        cls.check_params(params)
        if teacher.spec.get("head") != "linear":
            from kdcli.errors import UsageError

            raise UsageError("--method cvi needs a stage-1 teacher with a linear head (teach --head linear)")
        spec = {"arch": "cvi", "backbone": teacher.spec["backbone"], "head": "cvi",
                "in_chans": teacher.spec["in_chans"], "classifier": teacher.spec, "latent": params.latent,
                "hidden": params.hidden, "samples": params.samples, "head_input": params.head_input,
                "posterior_detached": not params.posterior_to_backbone}
        student = CVIClassifier(spec)
        student.start_from(teacher)
        student.spec["frozen"] = student.freeze_backbone(params.train_last)
        return student

    def train_rows(self, train_set: Any) -> np.ndarray | None:
        if not self.params.annotated_only:
            unlabeled = np.asarray(getattr(train_set, "labels", [])) < 0
            if not unlabeled.any():
                return None
            # labelled images all train the prior's BCE; an unlabeled one only helps through its annotation
            carrying = np.zeros(len(unlabeled), bool)
            carrying[annotated_rows(train_set, self.params.annotation)] = True
            return np.flatnonzero(~unlabeled | carrying)
        rows = annotated_rows(train_set, self.params.annotation)
        if not len(rows):
            from kdcli.errors import KdcliError

            raise KdcliError(f"no training image has {self.params.annotation}: CVI has nothing to distil",
                             hint="pick another -p annotation=gaze|boxes|both")
        return rows

    def make_validator(self, dev_set: Any, classes: list[str], engine: Any, log: Any):
        if not len(annotated_rows(dev_set, self.params.annotation)):
            log(f"no dev image has {self.params.annotation}: the posterior and the prior are not compared "
                "(dev_posterior_auroc_annotated and dev_prior_auroc_annotated are None)")
        return annotated_validator(dev_set, classes, engine, self.params.annotation)

    def fit_notes(self, history: list[dict[str, Any]]) -> list[str]:
        return annotation_verdict(history)

    def annotation_map(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return annotation_map(batch, self.params.annotation)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        annotation, annotated = self.annotation_map(batch)
        out = self.run_student(batch["image"], annotation)
        p, labels = self.params, batch["labels"]
        # unlabeled images (label -1) never reach a BCE: their label vector is all "unknown" anyway, but the
        # supervised terms are cut to the labelled rows explicitly
        labelled = batch["label"] >= 0 if "label" in batch else torch.ones_like(annotated)
        # annotated_only: the view holds annotated images only; the mask still guards a view that does not
        keep = (annotated if p.annotated_only else torch.ones_like(annotated)) & labelled
        terms = {"bce_prior": masked_bce(out["logits"][keep], labels[keep]) if keep.any()
                 else out["logits"].sum() * 0.0,
                 "_unlabeled": (~labelled).float().mean()}
        supervised = annotated & labelled
        if annotated.any():
            terms["bce_posterior"] = (p.posterior_weight * masked_bce(out["posterior_logits"][supervised],
                                                                      labels[supervised]) if supervised.any()
                                      else out["posterior_logits"].sum() * 0.0)
            mu_q, logvar_q = out["mu_q"][annotated], out["logvar_q"][annotated]
            if p.detach_posterior:
                mu_q, logvar_q = mu_q.detach(), logvar_q.detach()
            kl = kl_gaussians(mu_q, logvar_q, out["mu_p"][annotated], out["logvar_p"][annotated],
                              p.kl_reduction).mean()
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
