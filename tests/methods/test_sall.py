"""SALL's loss: hard labels on a head's own set, the other teacher's soft labels elsewhere, reversed gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcli.errors import UsageError
from kdcli.methods.sall import SALL, GradientReversal, SALLParams, soft_label_loss


class Backbone(nn.Module):
    num_features = 4

    def forward(self, x):
        return x


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.ModuleDict({"dr": nn.Linear(4, 5), "amd": nn.Linear(4, 3)})

    def forward(self, x):
        logits = {t: h(x) for t, h in self.head.items()}
        return {"features": x, "task_logits": logits, "logits": logits["dr"]}


class FixedTeacher(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.fixed = logits

    def forward(self, x):
        return {"logits": self.fixed}


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))


def test_each_head_gets_hard_labels_on_its_set_and_soft_labels_on_the_other():
    torch.manual_seed(0)
    student = TwoHeads()
    features = torch.randn(4, 4, requires_grad=True)
    sets = torch.tensor([0, 0, 1, 1])  # two DR images, two AMD images
    labels = torch.tensor([4, 1, 2, 0])  # each row's grade in its own set's label space
    teachers = {"dr": FixedTeacher(torch.randn(4, 5)), "amd": FixedTeacher(torch.randn(4, 3))}
    params = SALLParams(temperature=2.0, kd_weight=0.5, adv_weight=0.0)
    method = SALL(params, student, teachers)
    out = student(features)
    terms = method.loss({"image": features, "label": labels, "task": sets}, out)
    dr, amd = out["task_logits"]["dr"], out["task_logits"]["amd"]
    ce = (nn.functional.cross_entropy(dr[:2], labels[:2], reduction="sum")
          + nn.functional.cross_entropy(amd[2:], labels[2:], reduction="sum")) / 4
    kd = (soft_label_loss(dr[2:], teachers["dr"].fixed[2:], 2.0)
          + soft_label_loss(amd[:2], teachers["amd"].fixed[:2], 2.0)) / 4
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.5 * kd.item(), rel=1e-5)
    assert terms["adv"].item() == 0.0 and terms["own_kd"].item() == 0.0
    assert "teacher" not in dict(method.named_modules())  # teachers stay out of the optimizer and checkpoints


def zero_teachers(n: int) -> dict[str, FixedTeacher]:
    return {"dr": FixedTeacher(torch.zeros(n, 5)), "amd": FixedTeacher(torch.zeros(n, 3))}


def adversarial_batch(n: int = 6) -> dict[str, torch.Tensor]:
    features = torch.randn(n, 4, requires_grad=True)
    return {"image": features, "label": torch.zeros(n, dtype=torch.long), "task": torch.tensor([0, 1] * (n // 2))}


def test_unconditioned_constant_mode_is_the_plain_reversed_discriminator():
    """disc_condition=none, grl_schedule=constant: D(f) built and initialised as before, full reversal throughout."""
    torch.manual_seed(1)
    student = TwoHeads()
    params = SALLParams(adv_weight=1.0, kd_weight=0.0, grl_lambda=0.7, grl_schedule="constant", disc_condition="none")
    torch.manual_seed(5)
    method = SALL(params, student, zero_teachers(6))
    torch.manual_seed(5)
    before = nn.Sequential(nn.Linear(4, params.disc_hidden), nn.ReLU(), nn.Linear(params.disc_hidden, 2))
    assert all(torch.equal(a, b) for a, b in zip(method.discriminator.parameters(), before.parameters(), strict=True))
    batch = adversarial_batch()
    features = batch["image"]
    method.__dict__["progress"] = 0.0  # constant: the start of training reverses as hard as the end
    terms = method.loss(batch, student(features))
    terms["adv"].backward()
    assert method.discriminator[0].weight.grad.abs().sum() > 0
    probe = features.detach().requires_grad_()
    plain = nn.functional.cross_entropy(method.discriminator(probe), batch["task"])
    assert terms["adv"].item() == pytest.approx(plain.item(), rel=1e-6)
    # Without reversal the same loss would move features along -grad; with it they move along +grad, scaled.
    plain.backward()
    assert torch.allclose(features.grad, -0.7 * probe.grad, atol=1e-6)
    assert terms["_grl"].item() == pytest.approx(0.7)


def reversed_gradient(method: SALL, student: nn.Module, progress: float) -> tuple[torch.Tensor, float]:
    torch.manual_seed(2)
    batch = adversarial_batch()
    method.__dict__["progress"] = progress
    terms = method.loss(batch, student(batch["image"]))
    terms["adv"].backward()
    return batch["image"].grad, terms["_grl"].item()


@pytest.mark.parametrize("condition", ["predictions", "none"])
def test_dann_schedule_reverses_nothing_at_the_start_and_fully_at_the_end(condition):
    torch.manual_seed(1)
    student = TwoHeads()
    method = SALL(SALLParams(adv_weight=1.0, kd_weight=0.0, disc_condition=condition), student, zero_teachers(6))
    start, strength_start = reversed_gradient(method, student, 0.0)
    assert strength_start == 0.0 and torch.count_nonzero(start) == 0
    # The discriminator still learns from step 0: only the gradient into the backbone is scaled.
    assert method.discriminator[0].weight.grad.abs().sum() > 0
    half, strength_half = reversed_gradient(method, student, 0.5)
    end, strength_end = reversed_gradient(method, student, 1.0)
    assert strength_half == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # DANN, gamma 10: 0.987 halfway
    assert strength_end == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert torch.allclose(half * strength_end, end * strength_half, atol=1e-7)  # same direction, ramped size
    assert end.abs().sum() > 0


def test_conditioned_discriminator_reads_the_predicted_grades_and_never_moves_them():
    torch.manual_seed(3)
    student = TwoHeads()
    method = SALL(SALLParams(adv_weight=1.0, kd_weight=0.0), student, zero_teachers(6))
    batch = adversarial_batch()
    features = batch["image"]
    first = method.loss(batch, student(features))
    with torch.no_grad():  # other predicted grades for the very same features
        student.head["dr"].weight.mul_(-3.0)
        student.head["amd"].bias.add_(2.0)
    second = method.loss(batch, student(features))
    assert abs(first["adv"].item() - second["adv"].item()) > 1e-4
    second["adv"].backward()  # the adversary moves the features only: the predictions enter detached
    assert all(p.grad is None for p in student.head.parameters())
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("condition", ["predictions", "none"])
def test_terms_match_the_returned_keys_and_every_parameter_gets_a_gradient(condition):
    torch.manual_seed(4)
    student = TwoHeads()
    method = SALL(SALLParams(disc_condition=condition), student, zero_teachers(6))
    batch = adversarial_batch()
    method.__dict__["progress"] = 0.3
    terms = method.loss(batch, student(batch["image"]))
    assert set(terms) == set(SALL.terms)
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert all(p.grad is not None for p in method.parameters())  # DDP: every trainable part is in the graph


@pytest.mark.parametrize("override", [{"grl_schedule": "linear"}, {"disc_condition": "labels"}])
def test_unknown_schedule_or_condition_is_refused_in_one_line(override):
    key, value = next(iter(override.items()))
    with pytest.raises(UsageError, match=f"{key}='{value}' is not one of") as error:
        SALL(SALLParams(**override), TwoHeads(), zero_teachers(6))
    assert "\n" not in str(error.value)
