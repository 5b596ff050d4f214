"""OCT-CoDA (MultiEYE, arXiv 2412.09402): an OCT teacher guides a fundus student through concept
similarities, with unpaired, class-matched OCT partners.

Loss, as in xmed-lab/MultiEYE (process/finetune.py, model/flair_distill.py):
    L = CE(student) + [gate] * (L_global + L_local)
    gate: distil only while the teacher is better than the student on this batch (d_t < d_s and d_st > delta)
    L_global = beta * MSE(class-mean student similarities, class-mean teacher similarities),
               over classes present in both halves of the batch
    L_local  = alpha * mean over the two similarity layers of a supervised contrastive loss over the 2B
               similarity vectors (student + teacher), temperature tau, no L2 normalisation
As released, L_global carries no gradient: the official builds the student prototypes from `f_sim.detach()`,
so L_global is computed and logged but never trains the student. `global_grad=true` gives it one; that cost
about 4 points of test accuracy in kdcli's own ablation on the phantoms (README, Results).
The concept space is FLAIR's (image-text aligned) when the student is built with `--pretrained` from a FLAIR
checkpoint, whose vision projection becomes the concept head's W_v, and `--concept-embeddings` holds the text
tower's concept embeddings (kdcli.models.pretrained). The concept classifier sees the cosines unscaled, as in
the official code (`--concept-scale` sets a fixed factor).
Difference from the released code, on purpose: each OCT partner keeps its own label in L_local (identical to
the official whenever the class-matched draw succeeds).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from kdcli.errors import KdcliError
from kdcli.methods.base import Method


@dataclasses.dataclass
class CoDAParams:
    alpha: float = dataclasses.field(default=0.6, metadata={"help": "L_local weight (alpha_distill)"})
    beta: float = dataclasses.field(default=0.05, metadata={"help": "L_global weight (beta_distill)"})
    temperature: float = dataclasses.field(default=10.0, metadata={"help": "L_local temperature tau"})
    gate: bool = dataclasses.field(default=True, metadata={"help": "distil only when the teacher is better"})
    global_grad: bool = dataclasses.field(default=False, metadata={
        "help": "true = L_global trains the student (the released code detaches it)"})


def gate_open(student_logits, teacher_logits, student_labels, teacher_labels) -> bool:
    num_classes = student_logits.shape[1]
    p_s, p_t = student_logits.softmax(1), teacher_logits.softmax(1)
    d_s = (p_s - F.one_hot(student_labels, num_classes)).abs().sum(1).mean()
    d_t = (p_t - F.one_hot(teacher_labels, num_classes)).abs().sum(1).mean()
    d_st = (p_t - p_s).abs().sum(1).mean()
    epsilon = math.exp(-(d_t / (d_s + d_t)).item())
    delta = d_s - epsilon * d_t
    return bool(d_st > delta and d_t < d_s)


def class_prototype_loss(s_sims, t_sims, s_labels, t_labels, keep_grad: bool) -> torch.Tensor:
    """MSE between class-mean similarity matrices (B, L, K) of student and teacher."""
    shared = sorted(set(s_labels.tolist()) & set(t_labels.tolist()))
    if not shared:
        return s_sims.sum() * 0.0
    source = s_sims if keep_grad else s_sims.detach()
    s_proto = torch.stack([source[s_labels == c].mean(0) for c in shared])
    t_proto = torch.stack([t_sims[t_labels == c].mean(0) for c in shared])
    return F.mse_loss(s_proto, t_proto)


def supervised_contrastive(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. SupCon over raw vectors (N, K): mean over anchors with at least one positive."""
    logits = vectors @ vectors.t() / temperature
    self_mask = torch.eye(len(vectors), dtype=torch.bool, device=vectors.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has_positive = counts > 0
    if not has_positive.any():
        return vectors.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[has_positive]) / counts[has_positive]
    return per_anchor.mean()


class CoDA(Method):
    name = "coda"
    tasks = ("classification",)
    terms = ("ce", "glob", "local", "_gate")
    Params = CoDAParams
    needs_teacher = True
    pairing = "unpaired"

    def __init__(self, params, student, teacher=None):
        super().__init__(params, student, teacher)
        for role, model in (("student", student), ("teacher", teacher)):
            if model is None or model.spec.get("head") != "concept":
                raise KdcliError(f"coda needs a concept-head {role}",
                                 hint="train the teacher with `kdcli teach --head concept` (the MultiEYE default)")
        if student.spec["concepts"] != teacher.spec["concepts"]:
            raise KdcliError("teacher and student use different concept banks",
                             hint="distil with the teacher's concepts (leave --concepts unset)")

    def fit_notes(self, history: list[dict]) -> list[str]:
        gates = [row["train_gate"] for row in history if "train_gate" in row]
        if gates and max(gates) == 0:
            return ["warning: CoDA's gate never opened (the teacher was never better than the student on a batch), "
                    "so this student is its baseline; use a stronger teacher, or --concept-scale 10 for short runs "
                    "from scratch"]
        return []

    def loss(self, batch, out):
        labels, teacher_labels = batch["label"], batch["teacher_label"]
        terms = {"ce": F.cross_entropy(out["logits"], labels)}
        teacher_out = self.teacher_outputs(batch, "teacher_image")["teacher"]
        t_logits, t_sims = teacher_out["logits"].float(), teacher_out["sims"].float()
        s_sims = out["sims"].float()
        zero = s_sims.sum() * 0.0
        if self.params.gate and not gate_open(out["logits"].detach().float(), t_logits, labels, teacher_labels):
            terms.update(glob=zero, local=zero, _gate=torch.zeros((), device=zero.device))
            return terms
        terms["glob"] = self.params.beta * class_prototype_loss(
            s_sims, t_sims, labels, teacher_labels, self.params.global_grad)
        both_labels = torch.cat([labels, teacher_labels])
        layers = [
            supervised_contrastive(torch.cat([s_sims[:, layer], t_sims[:, layer]]), both_labels,
                                   self.params.temperature)
            for layer in range(s_sims.shape[1])
        ]
        terms["local"] = self.params.alpha * torch.stack(layers).mean()
        terms["_gate"] = torch.ones((), device=zero.device)
        return terms
