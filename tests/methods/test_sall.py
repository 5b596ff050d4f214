"""SALL's loss: hard labels on a head's own set, the other teacher's soft labels elsewhere, reversed gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcli.methods.sall import SALL, GradientReversal, SALLParams, soft_label_loss


class Backbone(nn.Module):
    num_features = 4

    def forward(self, x):
        return x


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.heads = nn.ModuleDict({"dr": nn.Linear(4, 5), "amd": nn.Linear(4, 3)})

    def forward(self, x):
        logits = {t: h(x) for t, h in self.heads.items()}
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


def test_adversarial_term_trains_the_discriminator_and_pushes_features_the_other_way():
    torch.manual_seed(1)
    student = TwoHeads()
    method = SALL(SALLParams(adv_weight=1.0, kd_weight=0.0), student,
                  {"dr": FixedTeacher(torch.zeros(6, 5)), "amd": FixedTeacher(torch.zeros(6, 3))})
    features = torch.randn(6, 4, requires_grad=True)
    batch = {"image": features, "label": torch.zeros(6, dtype=torch.long), "task": torch.tensor([0, 1] * 3)}
    terms = method.loss(batch, student(features))
    terms["adv"].backward()
    assert method.discriminator[0].weight.grad.abs().sum() > 0
    # Without reversal the same loss would move features along -grad; with it they move along +grad.
    probe = features.detach().requires_grad_()
    plain = nn.functional.cross_entropy(method.discriminator(probe), batch["task"])
    plain.backward()
    assert torch.allclose(features.grad, -probe.grad, atol=1e-6)
