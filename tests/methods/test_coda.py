"""OCT-CoDA's loss pieces against brute-force versions, and the gate's cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.errors import UsageError
from kdcli.methods.base import parse_params
from kdcli.methods.coda import CoDA, CoDAParams, class_prototype_loss, gate_open, supervised_contrastive
from kdcli.methods.losses import kd_loss


def brute_supcon(z: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        losses.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator)
                           for p in positives) / len(positives))
    return sum(losses) / len(losses)


def test_supervised_contrastive_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=generator)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    assert supervised_contrastive(z, y, 10.0).item() == pytest.approx(brute_supcon(z, y, 10.0), rel=1e-5)
    assert supervised_contrastive(z, y, 0.5).item() == pytest.approx(brute_supcon(z, y, 0.5), rel=1e-5)


def test_supervised_contrastive_without_positives_is_zero_with_gradient():
    z = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive(z, torch.tensor([0, 1, 2]), 10.0)
    assert loss.item() == 0.0
    loss.backward()


def test_prototype_loss_uses_shared_classes_and_gradient_switch():
    student = torch.randn(6, 2, 5, requires_grad=True)
    teacher = torch.randn(6, 2, 5)
    s_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    t_labels = torch.tensor([0, 1, 1, 3, 3, 3])
    loss = class_prototype_loss(student, teacher, s_labels, t_labels, keep_grad=True)
    expected = torch.stack([
        (student[:2].mean(0) - teacher[:1].mean(0)) ** 2,
        (student[2:4].mean(0) - teacher[1:3].mean(0)) ** 2,
    ]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad[4:].abs().sum() == 0  # class 2 absent from teacher
    frozen = class_prototype_loss(student, teacher, s_labels, t_labels, keep_grad=False)
    assert not frozen.requires_grad  # the released code's behaviour, on request


def test_gate_opens_only_when_the_teacher_is_better():
    labels = torch.tensor([0, 1, 2, 0])
    right = torch.nn.functional.one_hot(labels, 3).float() * 2.4
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 8
    # The official rule opens when the student is confidently wrong and the teacher is right ...
    assert gate_open(wrong, right, labels, labels)
    # ... and stays shut when the teacher is the worse one, or when both agree.
    assert not gate_open(right, wrong, labels, labels)
    assert not gate_open(right, right, labels, labels)


def test_kd_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(4, 5)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(4, 5), 4.0).item() > 0


def test_params_have_the_papers_defaults_and_reject_unknown_keys():
    params = parse_params(CoDAParams, {"alpha": "1.5", "gate": "false"}, "coda")
    assert (params.alpha, params.beta, params.temperature, params.gate) == (1.5, 0.05, 10.0, False)
    assert CoDAParams() == CoDAParams(alpha=0.6, beta=0.05, temperature=10.0, gate=True, global_grad=False)
    with pytest.raises(UsageError, match="alpha=0.6"):
        parse_params(CoDAParams, {"alpah": 1}, "coda")


def test_a_gate_that_never_opened_is_reported_as_a_student_equal_to_its_baseline():
    method = CoDA.__new__(CoDA)  # fit_notes reads the history only
    closed = [{"epoch": 1, "train_gate": 0.0}, {"epoch": 2, "train_gate": 0.0}]
    assert "gate never opened" in " ".join(CoDA.fit_notes(method, closed))
    assert CoDA.fit_notes(method, [*closed, {"epoch": 3, "train_gate": 0.25}]) == []
