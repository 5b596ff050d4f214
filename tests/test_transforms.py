"""The fused augmentation is the albumentations pipeline's geometry in one warp: identity, mirror, crop-and-
scale and rotation land pixels where the separate steps would, and masks follow the image."""

from __future__ import annotations

import numpy as np
import pytest

from kdcli.data.transforms import FusedAugment, albumentations_augmentation, train_augmentation


class Draws:
    """Stands in for numpy's Generator with chosen draws: uniform (crop area, log aspect, angle), integers (left,
    top), random (flip coin, rotate coin)."""

    def __init__(self, uniform, integers, coins):
        self.u, self.i, self.c = list(uniform), list(integers), list(coins)

    def uniform(self, low, high):
        return self.u.pop(0)

    def integers(self, low, high):
        return self.i.pop(0)

    def random(self):
        return self.c.pop(0)


def dot(shape=(32, 32), at=(5, 20)) -> np.ndarray:
    image = np.zeros((*shape, 1), np.uint8)
    image[at] = 255
    return image


def test_identity_and_mirror():
    augment = FusedAugment(32)
    augment.rng = Draws([1.0, 0.0], [0, 0], [0.9, 0.9])  # whole image, no flip, no rotation
    assert np.array_equal(augment(image=dot())["image"], dot())
    augment.rng = Draws([1.0, 0.0], [0, 0], [0.1, 0.9])  # flip only
    out = augment(image=dot())["image"]
    assert np.unravel_index(out[..., 0].argmax(), (32, 32)) == (5, 11)


def test_crop_scales_the_chosen_region_to_the_output():
    augment = FusedAugment(16)
    image = np.zeros((32, 32, 1), np.uint8)
    image[16:32, 16:32] = 200
    augment.rng = Draws([0.25, 0.0], [16, 16], [0.9, 0.9])  # a quarter of the area: the bottom-right quadrant
    assert np.all(augment(image=image)["image"] == 200)


def test_rotation_turns_about_the_centre_and_masks_follow():
    augment = FusedAugment(33)
    image, mask = dot((33, 33), (16, 30)), dot((33, 33), (16, 30))
    augment.rng = Draws([1.0, 0.0, 90.0], [0, 0], [0.9, 0.1])  # rotation by 90 degrees
    result = augment(image=image, masks=[mask])
    peak = np.unravel_index(result["image"][..., 0].argmax(), (33, 33))
    assert peak in {(2, 16), (30, 16)}  # a quarter turn about (16, 16)
    assert np.unravel_index(result["masks"][0][..., 0].argmax(), (33, 33)) == peak


@pytest.mark.parametrize("size", [24, 64])
def test_draws_cover_the_albumentations_ranges(size):
    """Same distribution of outputs' brightness as the three-step pipeline (coarse check on random images)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    fused, reference = train_augmentation(size), albumentations_augmentation(size)
    ours, theirs = [], []
    for seed in range(60):
        fused.set_random_state(np.random.default_rng(seed))
        ours.append(fused(image=image)["image"].mean())
        reference.set_random_state(np.random.default_rng(seed), __import__("random").Random(seed))
        theirs.append(reference(image=image)["image"].mean())
    assert fused(image=image)["image"].shape == (size, size, 3)
    assert abs(np.mean(ours) - np.mean(theirs)) < 3.0  # black corners from rotation in both, as often
