"""DKD (Zhao et al. 2022): its two terms against numbers worked out by hand with numpy, the paper's identity
KD = TCKD + (1 - p_t) NCKD, unlabeled rows (the teacher's class as target, no CE), the warm-up, and a paired
MultiEYE phantom with an unlabeled pool through `distill --method dkd` -> `evaluate` (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import kdcli_run
from torch import nn

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.methods.dkd import DKD, DKDParams, decoupled_kd
from kdcli.methods.losses import kd_loss

STUDENT = np.array([[1.0, 2.0, 0.5], [0.2, -1.0, 1.5]])
TEACHER = np.array([[3.0, 0.0, 1.0], [-0.5, 2.5, 0.0]])
TARGET = np.array([0, 1])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * np.log(p / q)).sum())


def by_hand(student: np.ndarray, teacher: np.ndarray, target: int, t: float) -> tuple[float, float]:
    """One sample's T^2 * TCKD and T^2 * NCKD from the paper's definitions."""
    p_s, p_t = softmax(student / t), softmax(teacher / t)
    b_s, b_t = np.array([p_s[target], 1 - p_s[target]]), np.array([p_t[target], 1 - p_t[target]])
    others = [k for k in range(len(student)) if k != target]
    return t**2 * kl(b_t, b_s), t**2 * kl(softmax(teacher[others] / t), softmax(student[others] / t))


def method(**params) -> DKD:
    return DKD(DKDParams(**params), nn.Linear(3, 3))


def loss(dkd: DKD, student, teacher, labels) -> dict[str, torch.Tensor]:
    batch = {"label": torch.as_tensor(labels), "cached": {"teacher": {"logits": torch.as_tensor(teacher).float()}}}
    return dkd.loss(batch, {"logits": torch.as_tensor(student).float()})


def test_identical_teacher_and_student_give_zero_distillation():
    terms = decoupled_kd(torch.tensor(STUDENT), torch.tensor(STUDENT), torch.tensor(TARGET), 4.0)
    assert terms["tckd"].abs().item() < 1e-6 and terms["nckd"].abs().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_terms_match_the_hand_computed_three_class_example(temperature):
    terms = loss(method(temperature=temperature, alpha=1.5, beta=8.0), STUDENT, TEACHER, TARGET)
    hand = np.array([by_hand(STUDENT[i], TEACHER[i], TARGET[i], temperature) for i in range(2)]).mean(0)
    assert hand.min() > 0.05  # a real difference, not two zeros agreeing
    assert terms["tckd"].item() == pytest.approx(1.5 * hand[0], rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(8.0 * hand[1], rel=1e-5)
    ce = -np.log(softmax(STUDENT[0])[0]) / 2 - np.log(softmax(STUDENT[1])[1]) / 2
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_alpha_one_beta_zero_leaves_tckd_alone_and_the_papers_identity_holds():
    terms = loss(method(alpha=1.0, beta=0.0), STUDENT[:1], TEACHER[:1], TARGET[:1])
    tckd, nckd = by_hand(STUDENT[0], TEACHER[0], 0, 4.0)
    assert terms["nckd"].item() == 0.0
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    # Eq. (1): KD = TCKD + (1 - p_t^T) NCKD, p_t^T the teacher's target probability at T
    kd = kd_loss(torch.tensor(STUDENT[:1]), torch.tensor(TEACHER[:1]), 4.0).item()
    assert kd == pytest.approx(tckd + (1 - softmax(TEACHER[0] / 4.0)[0]) * nckd, rel=1e-5)


def test_unlabeled_rows_take_the_teachers_class_and_no_cross_entropy():
    terms = loss(method(), STUDENT, TEACHER, [0, -1])
    teacher_class = int(TEACHER[1].argmax())  # 1
    hand = np.array([by_hand(STUDENT[0], TEACHER[0], 0, 4.0), by_hand(STUDENT[1], TEACHER[1], teacher_class, 4.0)])
    assert terms["tckd"].item() == pytest.approx(hand[:, 0].mean(), rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(8.0 * hand[:, 1].mean(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(-np.log(softmax(STUDENT[0])[0]), rel=1e-5)


def test_warmup_ramps_the_distillation_terms_linearly_per_epoch():
    dkd = method(warmup_epochs=4)
    full = loss(dkd, STUDENT, TEACHER, TARGET)  # outside the engine: no epoch, the ramp counts as done
    for epoch, factor in ((0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)):
        dkd.__dict__["epoch"] = epoch
        terms = loss(dkd, STUDENT, TEACHER, TARGET)
        assert terms["_warmup"].item() == factor
        assert terms["nckd"].item() == pytest.approx(factor * full["nckd"].item(), rel=1e-6)
        assert terms["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-6)  # CE is not ramped


@pytest.mark.slow
def test_distill_dkd_on_paired_phantom_writes_a_checkpoint_evaluate_reads(tmp_path):
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.multieye import synth_multieye

    synth_multieye(tmp_path / "raw", per_class=3, size=32, seed=2, paired=True, unlabeled=6)
    prepare(PrepareOptions(source="multieye", raw=tmp_path / "raw", out=tmp_path / "s", size=32))
    common = ["--data", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "8", "--workers", "0",
              "--model", "test_resnet", "--head", "linear"]
    kdcli_run("teach", *common, "--modality", "oct", "--out", tmp_path / "t.pt")
    distill = kdcli_run("distill", *common, "--teacher", tmp_path / "t.pt", "--student", "fundus", "--method", "dkd",
                        "-p", "beta=4", "--out", tmp_path / "dkd.pt")
    assert "6 unlabeled fundus samples: distillation terms only" in distill.output
    assert load_checkpoint(tmp_path / "dkd.pt").meta["method_params"]["beta"] == 4.0
    row = json.loads((tmp_path / "dkd.metrics.jsonl").read_text().splitlines()[0])
    assert row["train_warmup"] == pytest.approx(1 / 20)  # the engine's epoch 0 reached the ramp
    assert row["train_tckd"] > 0 and row["train_nckd"] > 0 and np.isfinite(row["train_ce"])
    report = kdcli_run("evaluate", tmp_path / "dkd.pt", "--data", tmp_path / "s", "--json")
    evaluated = json.loads(report.stdout)
    assert evaluated["metrics"]["n"] > 0 and 0 <= evaluated["metrics"]["accuracy"] <= 1
