"""The fused augmentation is the albumentations pipeline's geometry in one warp (or, without rotation, one crop
and resize): identity, mirror, crop-and-scale and rotation land pixels where the separate steps would, masks
follow the image, and draws depend on the item's seed only, so a batch is augmented as its items are alone."""

from __future__ import annotations

import numpy as np
import pytest

from kdcli.data.transforms import DRAWS, FusedAugment, albumentations_augmentation, item_uniforms, train_augmentation

NO_ROTATION, TINY_ROTATION = 0.0, 1e-9  # the crop-and-resize path, and the warp path with the same geometry


def chosen(shape, left=0, top=0, crop=None, flip=False, angle=0.0, contrast=1.0, brightness=0.0) -> dict:
    crop_h, crop_w = crop or shape
    values = {"left": left, "top": top, "crop_w": crop_w, "crop_h": crop_h, "flip": flip, "angle": angle,
              "contrast": contrast, "brightness": brightness}
    return {key: np.array([value]) for key, value in values.items()}


def dot(shape=(32, 32), at=(5, 20)) -> np.ndarray:
    image = np.zeros((*shape, 1), np.uint8)
    image[at] = 255
    return image


def peak(image: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(image[..., 0].argmax(), image.shape[:2]))


@pytest.mark.parametrize("angle", [NO_ROTATION, TINY_ROTATION])
def test_identity_and_mirror(angle):
    augment = FusedAugment(32)
    assert np.array_equal(augment.apply(dot(), chosen((32, 32), angle=angle))["image"], dot())
    mirrored = augment.apply(dot(), chosen((32, 32), flip=True, angle=angle))["image"]
    assert peak(mirrored) == (5, 11)


@pytest.mark.parametrize("angle", [NO_ROTATION, TINY_ROTATION])
def test_crop_scales_the_chosen_region_to_the_output(angle):
    augment = FusedAugment(16)
    image = np.zeros((32, 32, 1), np.uint8)
    image[16:32, 16:32] = 200
    out = augment.apply(image, chosen((32, 32), left=16, top=16, crop=(16, 16), angle=angle))["image"]
    assert np.all(out == 200)  # the bottom-right quadrant, nothing else


def test_rotation_turns_about_the_centre_and_masks_follow():
    augment = FusedAugment(33)
    image, mask = dot((33, 33), (16, 30)), dot((33, 33), (16, 30))
    result = augment.apply(image, chosen((33, 33), angle=90.0), masks=[mask])
    assert peak(result["image"]) in {(2, 16), (30, 16)}  # a quarter turn about (16, 16)
    assert peak(result["masks"][0]) == peak(result["image"])


@pytest.mark.parametrize("flip", [False, True])
def test_resize_path_matches_the_warp_inside_the_image(flip):
    """Without rotation the crop+resize shortcut samples the same points as the warp (pixel centres aligned);
    only the outermost ring may differ (the warp blends with its black border there)."""
    rng = np.random.default_rng(1)
    smooth = np.clip(rng.normal(128, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
    image = np.asarray(__import__("cv2").resize(smooth, (48, 48)))
    augment = FusedAugment(40)
    for left, top, crop in [(0, 0, (48, 48)), (5, 9, (37, 35)), (11, 2, (44, 30))]:  # (height, width)
        resized = augment.apply(image, chosen((48, 48), left, top, crop, flip, NO_ROTATION))["image"]
        warped = augment.apply(image, chosen((48, 48), left, top, crop, flip, TINY_ROTATION))["image"]
        assert np.abs(resized[1:-1, 1:-1].astype(int) - warped[1:-1, 1:-1]).max() <= 1


def test_masks_follow_the_resize_path_exactly():
    augment = FusedAugment(16)
    image, mask = dot((32, 32), (20, 8)), dot((32, 32), (20, 8))
    result = augment.apply(image, chosen((32, 32), left=4, top=12, crop=(16, 16), flip=True), masks=[mask])
    assert result["masks"][0].dtype == np.uint8 and result["masks"][0].max() == 255
    assert peak(result["masks"][0]) == peak(result["image"])


def test_brightness_clips_instead_of_folding_dark_pixels_back():
    augment = FusedAugment(8)
    image = np.full((8, 8, 1), 10, np.uint8)
    darker = augment.apply(image, chosen((8, 8), contrast=1.0, brightness=-30.0))["image"]
    assert np.all(darker == 0)  # |10 - 30| would be 20
    brighter = augment.apply(np.full((8, 8, 1), 250, np.uint8), chosen((8, 8), contrast=1.1, brightness=20.0))
    assert np.all(brighter["image"] == 255)


def test_item_uniforms_depend_on_the_seed_alone():
    seeds = np.array([0, 1, 2**63 + 5, 123456789], dtype=np.uint64)
    together = item_uniforms(seeds)
    assert together.shape == (4, DRAWS) and np.all((together >= 0) & (together < 1))
    for row, seed in zip(together, seeds, strict=True):
        assert np.array_equal(item_uniforms([int(seed)])[0], row)
    assert not np.allclose(together[0], together[1])
    many = item_uniforms(np.arange(20_000, dtype=np.uint64))
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize("strength", ["light", "strong"])
def test_a_batch_is_augmented_as_its_items_are_alone(strength):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (12, 40, 40, 3), dtype=np.uint8)
    augment = FusedAugment(24, strength)
    seeds = np.arange(100, 112, dtype=np.uint64)
    out = augment.batch(images, seeds, np.empty((12, 24, 24, 3), np.uint8))
    for k in range(12):
        alone = augment(image=images[k], seed=int(seeds[k]))["image"]
        assert np.abs(alone.astype(int) - out[k]).max() <= 1  # the same draws; last-ulp rounding at most
    assert len({out[k].tobytes() for k in range(12)}) == 12


def test_parameters_stay_in_the_albumentations_ranges():
    augment = FusedAugment(32, "strong")
    p = augment.parameters(item_uniforms(np.arange(5000, dtype=np.uint64)), 48, 40)
    area = p["crop_w"] * p["crop_h"] / (48 * 40)
    assert area.min() > 0.72 and area.max() <= 1.0
    assert np.all(p["left"] + p["crop_w"] <= 40) and np.all(p["top"] + p["crop_h"] <= 48)
    assert np.all(np.abs(p["angle"]) <= 10) and 0.45 < np.mean(p["angle"] == 0) < 0.55
    assert 0.45 < p["flip"].mean() < 0.55 and 0.45 < np.mean(p["contrast"] == 1) < 0.55
    assert p["contrast"].min() >= 0.85 and p["contrast"].max() <= 1.15 and np.abs(p["brightness"]).max() <= 38.25


@pytest.mark.parametrize("size", [24, 64])
def test_draws_cover_the_albumentations_ranges(size):
    """Same distribution of outputs' brightness as the three-step pipeline (coarse check on random images)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    fused, reference = train_augmentation(size), albumentations_augmentation(size)
    ours, theirs = [], []
    for seed in range(60):
        ours.append(fused(image=image, seed=seed)["image"].mean())
        reference.set_random_state(np.random.default_rng(seed), __import__("random").Random(seed))
        theirs.append(reference(image=image)["image"].mean())
    assert fused(image=image)["image"].shape == (size, size, 3)
    assert abs(np.mean(ours) - np.mean(theirs)) < 3.0  # black corners from rotation in both, as often
