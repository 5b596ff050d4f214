"""Augmentation on uint8 HWC arrays (albumentations). Normalisation happens inside the model, on device,
so loaders move uint8 (4x fewer bytes) and checkpoints carry their own preprocessing."""

from __future__ import annotations

import albumentations as A
import cv2


def train_augmentation(size: int, strength: str = "light") -> A.Compose | None:
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
