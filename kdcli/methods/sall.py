"""SALL, synergic adversarial label learning (Ju et al., IEEE JBHI 2021, arXiv 2003.10607): two sets, each
graded for one disease (DR on one, AMD on the other), teach one two-headed model.

No official code exists ("To Do" in the authors' README); this is our reconstruction from the abstract, every
choice a parameter:
    1. single-task teachers (`kdcli teach --task dr`, `--task amd`) are frozen;
    2. semantic space: each head learns hard labels on its own set and the other teacher's soft labels
       (temperature T) on the other set:  CE(own head, y) + kd_weight * T^2 * KL(teacher_T || head_T);
    3. feature space: a discriminator tells the two sets apart; a gradient reversal layer (GRL, Ganin &
       Lempitsky 2015) makes the backbone confuse it, aligning the sets:  adv_weight * CE(D(GRL(f), g), set).
Per-batch sums are divided by the batch size, so mixed batches weigh each sample once per head.

What the adversary may remove, and the two guards against it (neither is in the abstract; both are ours):
    * The two sets differ in more than acquisition: their grade priors differ too (each set is graded, and
      usually balanced, for its own disease; the other disease follows the population prior), and so do file
      format and camera. An unconditional discriminator D(f) uses whatever separates the sets, severity
      included, and the reversed gradient then pushes the backbone to discard severity, the very thing the
      graders need. So by default (`disc_condition=predictions`) the discriminator is conditioned on the
      predicted grades, as CDAN does (Long et al., NeurIPS 2018): it reads the multilinear map f ⊗ g, the
      outer product of the features f with g = [softmax(dr head), softmax(amd head)], g detached as in CDAN's
      official code (the adversary moves the features, never the predictions). A set difference that the
      predicted grades already explain (a prior shift) is then no use to the discriminator, so what is
      aligned is the feature distribution *given* the predicted grades: set cues such as compression and
      camera are pushed out, severity is kept. Its first layer has width x (sum of grades) inputs (2048 x 9
      for a ResNet-50 on DR + AMD, about 4.7 M weights at disc_hidden=256). `disc_condition=none` is D(f),
      the unconditional behaviour of earlier versions.
    * The reversal strength ramps from 0 to grl_lambda as in DANN (Ganin & Lempitsky 2015, section 5.2.2):
      lambda_p = grl_lambda * (2 / (1 + exp(-grl_gamma * p)) - 1), p the training progress in [0, 1) (the
      engine's `progress`), grl_gamma = 10 as in the paper. At the start the features and predictions are
      noise and the discriminator is untrained, so a full-strength reversal only scrambles the backbone
      before the graders have learnt anything; the discriminator itself trains at full rate from step 0
      (the GRL scales only the gradient into the backbone). `grl_schedule=constant` keeps grl_lambda
      throughout (earlier versions). The strength in use is logged as `_grl`; `_set_accuracy` is how often
      the discriminator tells the sets apart (chance, i.e. aligned, is the larger set's share of a batch).

Unlabeled samples (label -1): not used (`unlabeled = False`; `kdcli methods` says "not used", `distill` notes
how many it leaves out). SALL's extra labels already are soft labels on images nobody graded for that head
(the DR set is ungraded for AMD, the AMD set for DR), so a pool graded for neither adds more of the same kind,
not a new lever; and such a sample belongs to no set: the discriminator (one class per set), the (task, grade)
balanced sampler and `prepare fundus-grading` (one graded set per call) have no place for it. A third,
ungraded set would need all three; until then fundus-grading datasets hold no unlabeled samples.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import UsageError
from kdcli.methods.base import Method
from kdcli.methods.losses import kd_loss

GRL_SCHEDULES = ("dann", "constant")
DISC_CONDITIONS = ("predictions", "none")


@dataclasses.dataclass
class SALLParams:
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "soft-label temperature T"})
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the other teacher's soft labels"})
    own_kd_weight: float = dataclasses.field(default=0.0, metadata={"help": "soft labels of a set's own teacher"})
    adv_weight: float = dataclasses.field(default=0.1, metadata={"help": "weight of the adversarial feature term"})
    grl_lambda: float = dataclasses.field(default=1.0, metadata={"help": "gradient reversal strength (its maximum)"})
    grl_schedule: str = dataclasses.field(default="dann", metadata={
        "help": "reversal strength over training: dann (0 -> grl_lambda, Ganin & Lempitsky) | constant"})
    grl_gamma: float = dataclasses.field(default=10.0, metadata={"help": "steepness of the dann ramp"})
    disc_condition: str = dataclasses.field(default="predictions", metadata={
        "help": "discriminator input: predictions (CDAN, features x predicted grades) | none (features only)"})
    disc_hidden: int = dataclasses.field(default=256, metadata={"help": "discriminator hidden width"})


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def reversal_strength(progress: float, grl_lambda: float, schedule: str, gamma: float) -> float:
    """DANN's ramp 2 / (1 + exp(-gamma p)) - 1 from 0 at p = 0 towards 1, times grl_lambda; or grl_lambda."""
    if schedule == "constant":
        return grl_lambda
    return grl_lambda * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the given samples (divided by the batch later)."""
    return kd_loss(student_logits, teacher_logits, temperature, reduction="sum")


class SALL(Method):
    name = "sall"
    tasks = ("classification",)
    terms = ("ce", "kd", "own_kd", "adv", "_set_accuracy", "_grl")
    Params = SALLParams
    needs_teacher = True
    per_task_teachers = True

    def __init__(self, params, student, teacher=None):
        if params.grl_schedule not in GRL_SCHEDULES:
            raise UsageError(f"method 'sall': grl_schedule={params.grl_schedule!r} is not one of "
                             f"{', '.join(GRL_SCHEDULES)}")
        if params.disc_condition not in DISC_CONDITIONS:
            raise UsageError(f"method 'sall': disc_condition={params.disc_condition!r} is not one of "
                             f"{', '.join(DISC_CONDITIONS)}")
        super().__init__(params, student, teacher)
        self.tasks = list(teacher)
        width = student.backbone.num_features
        if params.disc_condition == "predictions":  # f ⊗ [p_task ...]: one feature block per predicted grade
            width *= sum(student.head[task].out_features for task in self.tasks)
        self.discriminator = nn.Sequential(nn.Linear(width, params.disc_hidden), nn.ReLU(inplace=True),
                                           nn.Linear(params.disc_hidden, len(self.tasks)))

    def grl_strength(self) -> float:
        # Outside the engine (no `progress` set) the schedule counts as finished, as CVI's KL annealing does.
        p = self.params
        return reversal_strength(float(self.__dict__.get("progress", 1.0)), p.grl_lambda, p.grl_schedule,
                                 p.grl_gamma)

    def discriminator_input(self, features: torch.Tensor, task_logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The features, or (conditioned) their outer product with the detached predicted grades, flattened."""
        if self.params.disc_condition == "none":
            return features
        predictions = torch.cat([task_logits[task].detach().float().softmax(1) for task in self.tasks], 1)
        return (predictions.unsqueeze(2) * features.unsqueeze(1)).flatten(1)

    def loss(self, batch, out):
        labels, sets = batch["label"], batch["task"]
        size = len(labels)
        soft = {task: teacher_out["logits"] for task, teacher_out in self.teacher_outputs(batch, "image").items()}
        zero = out["features"].sum() * 0.0
        ce, kd, own_kd = zero, zero, zero
        for index, task in enumerate(self.tasks):
            logits, own = out["task_logits"][task], sets == index
            if own.any():
                ce = ce + F.cross_entropy(logits[own], labels[own], reduction="sum")
                if self.params.own_kd_weight:
                    own_kd = own_kd + soft_label_loss(logits[own], soft[task][own], self.params.temperature)
            if (~own).any():
                kd = kd + soft_label_loss(logits[~own], soft[task][~own], self.params.temperature)
        strength = self.grl_strength()
        reversed_features = GradientReversal.apply(out["features"], strength)
        set_logits = self.discriminator(self.discriminator_input(reversed_features.float(), out["task_logits"]))
        return {
            "ce": ce / size,
            "kd": self.params.kd_weight * kd / size,
            "own_kd": self.params.own_kd_weight * own_kd / size,
            "adv": self.params.adv_weight * F.cross_entropy(set_logits, sets),
            "_set_accuracy": (set_logits.argmax(1) == sets).float().mean(),
            "_grl": torch.tensor(strength, device=set_logits.device),
        }
