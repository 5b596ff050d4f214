"""ProtoKD's losses against direct computations: pixel KD without T^2, prototypes from ground-truth masks,
classes shared by every sample, cosine maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.methods.protokd import pixel_kd, prototype_loss, shared_classes, similarity_maps
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
    mask = torch.randint(0, 2, (2, 4, 4))
    maps = similarity_maps(features, mask, [0, 1])
    for n in range(2):
        for k, c in enumerate([0, 1]):
            selected = features[n][:, mask[n] == c]
            prototype = selected.sum(1) / (selected.shape[1] + 1e-5)
            expected = F.cosine_similarity(features[n], prototype[:, None, None], dim=0)
            assert torch.allclose(maps[n, k], expected, atol=1e-5)


def test_prototype_loss_zero_for_identical_features_and_positive_otherwise():
    torch.manual_seed(2)
    mask = torch.randint(0, 3, (2, 8, 8))
    features = torch.randn(2, 5, 8, 8)
    assert prototype_loss(features, features.clone(), mask, 4) < 1e-10
    assert prototype_loss(features, torch.randn(2, 7, 8, 8), mask, 4) > 1e-3  # channel counts may differ


def test_prototype_loss_is_zero_and_differentiable_when_no_class_is_shared():
    mask = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long)])
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = prototype_loss(features, torch.randn(2, 3, 4, 4), mask, 4)
    loss.backward()
    assert loss.item() == 0.0 and features.grad is not None


def test_segmentation_losses_reward_correct_maps():
    mask = torch.randint(0, 4, (2, 6, 6))
    perfect = F.one_hot(mask, 4).permute(0, 3, 1, 2).float() * 20
    assert soft_dice_loss(perfect, mask) < 0.05 < soft_dice_loss(torch.zeros_like(perfect), mask)
    assert weighted_cross_entropy(perfect, mask) < 1e-3
