"""Augmentation on uint8 HWC arrays. Normalisation happens inside the model, on device, so loaders move uint8
(4x fewer bytes) and checkpoints carry their own preprocessing.

`train_augmentation` is a random resized crop (scale 0.75-1, ratio 0.9-1.1), a horizontal flip (p=.5) and a
rotation of up to 10 degrees (p=.5), plus brightness/contrast (p=.5) for "strong". kdcli applies the three
geometric steps as ONE affine warp (`FusedAugment`): the same transforms and ranges as the albumentations
pipeline (`albumentations_augmentation`, kept for comparison and for anyone extending it), one interpolation
instead of two, and a fraction of the per-sample cost (`kdcli bench loader`)."""

from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np


class FusedAugment:
    """Called like an albumentations pipeline: `set_random_state(numpy_rng, python_random)`, then
    `augment(image=..., masks=[...])` -> {"image", "masks"}; masks follow the geometry with nearest sampling."""

    needs_python_random = False

    def __init__(self, size: int, strength: str = "light"):
        self.size, self.strength = size, strength
        self.rng = np.random.default_rng(0)

    def set_random_state(self, rng: np.random.Generator, python_random=None) -> None:
        self.rng = rng

    def matrix(self, height: int, width: int) -> np.ndarray:
        """Output pixel -> input pixel (2x3) for one random draw of crop, flip and rotation."""
        rng, size = self.rng, self.size
        area = height * width * rng.uniform(0.75, 1.0)
        aspect = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
        crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
        crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        flip = rng.random() < 0.5
        angle = math.radians(rng.uniform(-10, 10)) if rng.random() < 0.5 else 0.0
        centre = (size - 1) / 2
        cos, sin = math.cos(angle), math.sin(angle)
        rotate = np.array([[cos, -sin], [sin, cos]])
        shift = np.array([centre, centre]) - rotate @ np.array([centre, centre])
        if flip:  # mirror the rotated output coordinates
            rotate, shift = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ rotate, np.array([size - 1 - shift[0], shift[1]])
        scale = np.diag([crop_w / size, crop_h / size])
        offset = np.array([left + 0.5 * crop_w / size - 0.5, top + 0.5 * crop_h / size - 0.5])
        return np.hstack([scale @ rotate, (scale @ shift + offset)[:, None]])

    def __call__(self, image: np.ndarray, masks: list[np.ndarray] | tuple = ()) -> dict:
        matrix = self.matrix(*image.shape[:2])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        out = cv2.warpAffine(image, matrix, (self.size, self.size), flags=flags, borderMode=cv2.BORDER_CONSTANT)
        out = out[:, :, None] if out.ndim == 2 else out
        if self.strength == "strong" and self.rng.random() < 0.5:
            contrast, brightness = 1 + self.rng.uniform(-0.15, 0.15), 255 * self.rng.uniform(-0.15, 0.15)
            out = cv2.convertScaleAbs(out, alpha=contrast, beta=brightness).reshape(out.shape)
        warped = [cv2.warpAffine(m, matrix, (self.size, self.size), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_CONSTANT) for m in masks]
        return {"image": out, "masks": [w[:, :, None] if w.ndim == 2 else w for w in warped]}


def train_augmentation(size: int, strength: str = "light") -> FusedAugment | None:
    if strength == "none":
        return None
    return FusedAugment(size, strength)


def albumentations_augmentation(size: int, strength: str = "light") -> A.Compose | None:
    """The same augmentation as three albumentations steps (two interpolations)."""
    if strength == "none":
        return None
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=(0.75, 1.0), ratio=(0.9, 1.1),
                            interpolation=cv2.INTER_LINEAR),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-10, 10), p=0.5, border_mode=cv2.BORDER_CONSTANT),
    ]
    if strength == "strong":
        steps.append(A.RandomBrightnessContrast(0.15, 0.15, p=0.5))
    return A.Compose(steps)
