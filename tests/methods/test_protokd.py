"""ProtoKD's losses against direct computations: pixel KD without T^2, prototypes from ground-truth masks,
cosine maps, the (sample, class) pairs of each rule (per sample by default, classes shared by every sample as
the official code) and the logged shares of pairs and batches where tumour classes contribute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import UsageError
from kdcli.methods.base import parse_params
from kdcli.methods.protokd import (
    ProtoKD,
    ProtoKDParams,
    pixel_kd,
    prototype_loss,
    prototype_terms,
    shared_classes,
    similarity_maps,
)
from kdcli.methods.segmentation import soft_dice_loss, weighted_cross_entropy


def test_pixel_kd_is_mean_kl_over_every_element_without_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    t = 10.0
    p_t = F.softmax(teacher / t, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(student / t, 1))).mean()
    assert torch.allclose(pixel_kd(student, teacher, t), expected, atol=1e-7)
    assert pixel_kd(teacher, teacher, t).abs() < 1e-7


def test_shared_classes_are_those_in_every_sample():
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, 0, 0], mask[0, 1, 1], mask[1, 0, 0] = 1, 3, 1
    assert shared_classes(mask, 4) == [0, 1]


def test_similarity_maps_match_brute_force():
    torch.manual_seed(1)
    features = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))
    maps = similarity_maps(features, mask, 4)
    assert maps.shape == (2, 4, 4, 4)
    for n in range(2):
        for c in range(4):
            selected = features[n][:, mask[n] == c]
            prototype = selected.sum(1) / (selected.shape[1] + 1e-5)
            expected = F.cosine_similarity(features[n], prototype[:, None, None], dim=0, eps=1e-8)
            assert torch.allclose(maps[n, c], expected, atol=1e-5)
    assert maps[:, 3].abs().max() == 0  # class 3 absent: zero prototype, zero map


def slow_prototype_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, num_classes: int,
                        rule: str) -> torch.Tensor:
    """A loop over samples and classes, from the definition; "shared" is the official mean over (N, K, H, W)."""
    shared = [c for c in range(num_classes) if all((m == c).any() for m in mask)]
    errors = []
    for n in range(len(mask)):
        classes = [c for c in range(num_classes) if (mask[n] == c).any()] if rule == "per_sample" else shared
        for c in classes:
            maps = []
            for features in (student[n], teacher[n]):
                selected = features[:, mask[n] == c]
                prototype = selected.sum(1) / (selected.shape[1] + 1e-5)
                maps.append(F.cosine_similarity(features, prototype[:, None, None], dim=0, eps=1e-8))
            errors.append((maps[0] - maps[1]).pow(2).mean())
    return torch.stack(errors).mean() if errors else torch.zeros(())


def test_prototype_loss_closed_form_on_a_hand_built_batch():
    # Two 1x2 slices with 2-channel features. Slice 0: background then class 1; slice 1: background only.
    mask = torch.tensor([[[0, 1]], [[0, 0]]])
    student = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]).unsqueeze(0).repeat(2, 1, 1, 1)  # pixels (1,0), (0,1)
    teacher = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]).unsqueeze(0).repeat(2, 1, 1, 1)  # pixels (1,0), (1,0)
    # slice 0: student maps M0 = [1, 0], M1 = [0, 1]; teacher maps M0 = M1 = [1, 1] -> 1/2 per class
    # slice 1: student prototype (1,1)/2 -> M0 = [1/sqrt2, 1/sqrt2]; teacher M0 = [1, 1] -> (1 - 1/sqrt2)^2
    background_only = (1 - 1 / math.sqrt(2)) ** 2
    per_sample = prototype_loss(student, teacher, mask, 4, "per_sample")
    shared = prototype_loss(student, teacher, mask, 4, "shared")
    assert per_sample.item() == pytest.approx((0.5 + 0.5 + background_only) / 3, rel=1e-4)
    assert shared.item() == pytest.approx((0.5 + background_only) / 2, rel=1e-4)


@pytest.mark.parametrize("rule", ["per_sample", "shared"])
def test_prototype_loss_matches_a_loop_over_samples_and_classes(rule):
    torch.manual_seed(3)
    mask = torch.zeros(4, 6, 6, dtype=torch.long)
    mask[0, :2, :2], mask[0, 4:, 4:] = 1, 3  # {0, 1, 3}
    mask[2, 1:3, 1:4], mask[2, 5, 5] = 2, 1  # {0, 1, 2}; samples 1 and 3 background only
    student, teacher = torch.randn(4, 5, 6, 6), torch.randn(4, 3, 6, 6)
    expected = slow_prototype_loss(student, teacher, mask, 4, rule)
    assert torch.allclose(prototype_loss(student, teacher, mask, 4, rule), expected, atol=1e-6)


class Fixed(nn.Module):
    def __init__(self, out: dict[str, torch.Tensor]):
        super().__init__()
        self.out = out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.out


def tumour_and_empty_batch():
    """Slice 0 with enhancing tumour (class 3) on three pixels, slice 1 tumour-free."""
    torch.manual_seed(4)
    mask = torch.zeros(2, 6, 6, dtype=torch.long)
    mask[0, 2, 1:4] = 3
    student, teacher = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    logits = torch.randn(2, 4, 6, 6)
    batch = {"image": torch.zeros(2, 1, 6, 6), "teacher_image": torch.zeros(2, 4, 6, 6), "mask": mask}
    return batch, student, teacher, logits


def proto_term(params: ProtoKDParams, batch, student, teacher, logits) -> torch.Tensor:
    method = ProtoKD(params, Fixed({}), Fixed({"features": teacher, "logits": logits}))
    return method.loss(batch, {"features": student, "logits": logits})["proto"]


def test_default_prototype_term_sees_the_tumour_of_one_slice_when_another_has_none():
    batch, student, teacher, logits = tumour_and_empty_batch()
    # Scale each tumour pixel's student features by a different positive factor: every pixel's cosine to the
    # (unchanged) background prototype stays the same, only the tumour prototype turns.
    perturbed = student.clone()
    perturbed[0, :, 2, 1:4] *= torch.tensor([0.2, 1.0, 5.0])
    default = ProtoKDParams()
    assert default.prototype_classes == "per_sample"
    before, after = proto_term(default, batch, student, teacher, logits), proto_term(default, batch, perturbed,
                                                                                     teacher, logits)
    assert abs(after.item() - before.item()) > 1e-3 * before.item()
    official = ProtoKDParams(prototype_classes="shared")  # background alone: blind to the tumour
    assert proto_term(official, batch, perturbed, teacher, logits).item() == pytest.approx(
        proto_term(official, batch, student, teacher, logits).item(), rel=1e-5)


def test_logged_shares_of_tumour_pairs_and_batches():
    mask = torch.zeros(4, 4, 4, dtype=torch.long)
    mask[0, 0, 0], mask[0, 1, 1], mask[2, 3, 3] = 1, 3, 2  # pairs: {0,1,3}, {0}, {0,2}, {0}
    features = torch.randn(4, 3, 4, 4)
    per_sample = prototype_terms(features, features, mask, 4, "per_sample")
    assert per_sample["_proto_tumour_pairs"].item() == pytest.approx(3 / 7)
    assert per_sample["_proto_tumour_batches"].item() == 1.0
    shared = prototype_terms(features, features, mask, 4, "shared")  # background in every sample, nothing else
    assert shared["_proto_tumour_pairs"].item() == 0.0 and shared["_proto_tumour_batches"].item() == 0.0
    mask[:, 2, 2] = 1  # now class 1 is in every sample: 4 of the 8 shared pairs are tumour
    shared = prototype_terms(features, features, mask, 4, "shared")
    assert shared["_proto_tumour_pairs"].item() == pytest.approx(0.5)
    assert shared["_proto_tumour_batches"].item() == 1.0
    empty = prototype_terms(features, features, torch.zeros(4, 4, 4, dtype=torch.long), 4, "per_sample")
    assert empty["_proto_tumour_pairs"].item() == 0.0 and empty["_proto_tumour_batches"].item() == 0.0


def test_method_returns_the_terms_it_declares():
    batch, student, teacher, logits = tumour_and_empty_batch()
    method = ProtoKD(ProtoKDParams(), Fixed({}), Fixed({"features": teacher, "logits": logits}))
    terms = method.loss(batch, {"features": student, "logits": logits})
    assert tuple(terms) == ProtoKD.terms
    assert terms["_proto_tumour_batches"].item() == 1.0
    assert terms["_proto_tumour_pairs"].item() == pytest.approx(1 / 3)  # (0, bg), (0, ET), (1, bg)


def test_unknown_prototype_rule_is_refused_in_one_line():
    with pytest.raises(UsageError, match="prototype_classes='all' is not one of per_sample, shared"):
        ProtoKDParams(prototype_classes="all")
    with pytest.raises(UsageError) as error:
        parse_params(ProtoKDParams, {"prototype_classes": "every"}, "protokd")
    assert "\n" not in str(error.value)
    assert parse_params(ProtoKDParams, {"prototype_classes": "shared"}, "protokd").prototype_classes == "shared"


@pytest.mark.parametrize("rule", ["per_sample", "shared"])
def test_gradient_reaches_student_features_only(rule):
    batch, student, teacher, _ = tumour_and_empty_batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    prototype_loss(student, teacher, batch["mask"], 4, rule).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_prototype_loss_zero_for_identical_features_and_positive_otherwise():
    torch.manual_seed(2)
    mask = torch.randint(0, 3, (2, 8, 8))
    features = torch.randn(2, 5, 8, 8)
    assert prototype_loss(features, features.clone(), mask, 4) < 1e-10
    assert prototype_loss(features, torch.randn(2, 7, 8, 8), mask, 4) > 1e-3  # channel counts may differ


def test_shared_prototype_loss_is_zero_and_differentiable_when_no_class_is_shared():
    mask = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)])
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = prototype_loss(features, torch.randn(2, 3, 4, 4), mask, 4, "shared")
    loss.backward()
    assert loss.item() == 0.0 and features.grad is not None
    assert prototype_loss(features, torch.randn(2, 3, 4, 4), mask, 4, "per_sample").item() > 0


def test_segmentation_losses_reward_correct_maps():
    mask = torch.randint(0, 4, (2, 6, 6))
    perfect = F.one_hot(mask, 4).permute(0, 3, 1, 2).float() * 20
    assert soft_dice_loss(perfect, mask) < 0.05 < soft_dice_loss(torch.zeros_like(perfect), mask)
    assert weighted_cross_entropy(perfect, mask) < 1e-3


@pytest.mark.parametrize(("method", "task", "suggested"), [("coda", "segmentation", "protokd"),
                                                           ("protokd", "classification", "kd"),
                                                           ("kd", "mil", "bidirectional")])
def test_a_method_on_another_task_is_refused_naming_the_methods_that_fit(method, task, suggested):
    from kdcli.errors import UsageError
    from kdcli.methods import METHODS

    with pytest.raises(UsageError, match=f"this dataset is {task}: use --method .*{suggested}"):
        METHODS.get(method).check_task(task)
    METHODS.get(method).check_task(METHODS.get(method).tasks[0])  # its own task passes
