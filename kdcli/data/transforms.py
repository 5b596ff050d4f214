"""Augmentation on uint8 HWC arrays. Normalisation happens inside the model, on device, so loaders move uint8
(4x fewer bytes) and checkpoints carry their own preprocessing.

`train_augmentation` is a random resized crop (scale 0.75-1, ratio 0.9-1.1), a horizontal flip (p=.5) and a
rotation of up to 10 degrees (p=.5), plus brightness/contrast (p=.5) for "strong". kdcli applies the three
geometric steps as ONE affine warp (`FusedAugment`): the same transforms and ranges as the albumentations
pipeline (`albumentations_augmentation`, kept for comparison and for anyone extending it), one interpolation
instead of two, and a fraction of the per-sample cost (`kdcli bench loader`).

Random draws are a pure function of an item's seed (`item_uniforms`), so an item is augmented the same way
alone, in a batch (`FusedAugment.batch`, which draws for the whole batch at once) or in any DataLoader worker."""

from __future__ import annotations

import math

import cv2
import numpy as np

from kdcli.extras import require

# uniforms per item: area, aspect, left, top, flip coin, rotate coin, angle, colour coin, contrast, brightness
DRAWS = 10
_MASK64 = (1 << 64) - 1


def item_uniforms(seeds, count: int = DRAWS) -> np.ndarray:
    """(len(seeds), count) uniforms in [0, 1): splitmix64 of seed * count + k, vectorised over the batch."""
    seeds = np.asarray([int(s) & _MASK64 for s in seeds] if not isinstance(seeds, np.ndarray) else seeds)
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class FusedAugment:
    """Called like an albumentations pipeline, `augment(image=..., masks=[...])` -> {"image", "masks"}, plus
    `seed=` for reproducible draws; masks follow the geometry with nearest sampling. `batch` augments a whole
    NHWC batch into a caller's buffer."""

    needs_python_random = False

    def __init__(self, size: int, strength: str = "light"):
        self.size, self.strength = size, strength
        self.rng = np.random.default_rng(0)

    def set_random_state(self, rng: np.random.Generator, python_random=None) -> None:
        """Where unseeded calls draw from (albumentations' interface)."""
        self.rng = rng

    def parameters(self, uniforms: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
        """Crop box, flip, angle (degrees), contrast and brightness per row of uniforms."""
        u = uniforms
        area = height * width * (0.75 + 0.25 * u[:, 0])
        aspect = np.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * u[:, 1])
        crop_w = np.clip(np.round(np.sqrt(area * aspect)), 1, width)
        crop_h = np.clip(np.round(np.sqrt(area / aspect)), 1, height)
        colour = (u[:, 7] < 0.5) if self.strength == "strong" else np.zeros(len(u), bool)
        return {"left": np.floor(u[:, 2] * (width - crop_w + 1)), "top": np.floor(u[:, 3] * (height - crop_h + 1)),
                "crop_w": crop_w, "crop_h": crop_h, "flip": u[:, 4] < 0.5,
                "angle": np.where(u[:, 5] < 0.5, -10 + 20 * u[:, 6], 0.0),
                "contrast": np.where(colour, 0.85 + 0.3 * u[:, 8], 1.0),
                "brightness": np.where(colour, 255 * (-0.15 + 0.3 * u[:, 9]), 0.0)}

    def matrices(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """(n, 2, 3) maps from output pixel to input pixel: rotate about the centre, mirror, then scale the
        output square onto the crop box (pixel centres aligned, as cv2.resize does)."""
        size, centre = self.size, (self.size - 1) / 2
        angle = np.radians(p["angle"])
        cos, sin = np.cos(angle), np.sin(angle)
        a00, a01, a10, a11 = cos, -sin, sin, cos
        t0, t1 = centre - (cos - sin) * centre, centre - (sin + cos) * centre
        mirror = np.where(p["flip"], -1.0, 1.0)
        a00, a01 = mirror * a00, mirror * a01
        t0 = np.where(p["flip"], size - 1 - t0, t0)
        sx, sy = p["crop_w"] / size, p["crop_h"] / size
        out = np.empty((len(angle), 2, 3))
        out[:, 0] = np.stack([sx * a00, sx * a01, sx * t0 + p["left"] + 0.5 * sx - 0.5], axis=1)
        out[:, 1] = np.stack([sy * a10, sy * a11, sy * t1 + p["top"] + 0.5 * sy - 0.5], axis=1)
        return out

    def _transform(self, image: np.ndarray, p: dict[str, np.ndarray], k: int, matrix: np.ndarray,
                   out: np.ndarray, nearest: bool = False) -> None:
        """Item k's geometry into `out`. Without rotation (half the draws) the same map is a crop, a resize and
        a mirror, which cv2 does at a quarter of the warp's cost (albumentations' crop path exactly); with it,
        one warp."""
        # cv2 writes (H, W) and (H, W, C>1) buffers in place; a (H, W, 1) one it would replace
        target = out[:, :, 0] if out.shape[2] == 1 else out
        source = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if p["angle"][k] == 0:
            left, top, width, height = (int(p[key][k]) for key in ("left", "top", "crop_w", "crop_h"))
            interpolation = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR
            cv2.resize(source[top : top + height, left : left + width], (self.size, self.size), dst=target,
                       interpolation=interpolation)
            if p["flip"][k]:
                cv2.flip(target, 1, dst=target)
            return
        flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        cv2.warpAffine(source, matrix, (self.size, self.size), dst=target, flags=flags,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    @staticmethod
    def _colour(image: np.ndarray, contrast: float, brightness: float) -> None:
        if contrast != 1.0 or brightness != 0.0:  # a lookup table: exact clipping, one pass
            table = np.clip(np.arange(256) * contrast + brightness, 0, 255).astype(np.uint8)
            image[...] = table[image]

    def __call__(self, image: np.ndarray, masks: list[np.ndarray] | tuple = (), seed: int | None = None) -> dict:
        uniforms = item_uniforms([seed]) if seed is not None else self.rng.random((1, DRAWS))
        return self.apply(image, self.parameters(uniforms, *image.shape[:2]), masks)

    def apply(self, image: np.ndarray, p: dict[str, np.ndarray], masks: list[np.ndarray] | tuple = ()) -> dict:
        """One item with chosen parameters (`parameters`' arrays, length 1)."""
        matrix = self.matrices(p)[0]
        image = image if image.ndim == 3 else image[:, :, None]
        out = np.empty((self.size, self.size, image.shape[2]), image.dtype)
        self._transform(image, p, 0, matrix, out)
        self._colour(out, float(p["contrast"][0]), float(p["brightness"][0]))
        warped = []
        for mask in masks:
            mask = mask if mask.ndim == 3 else mask[:, :, None]
            target = np.empty((self.size, self.size, mask.shape[2]), mask.dtype)
            self._transform(mask, p, 0, matrix, target, nearest=True)
            warped.append(target)
        return {"image": out, "masks": warped}

    def batch(self, images: np.ndarray, seeds: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Augment an NHWC uint8 batch into `out` (N, size, size, C): draws and matrices for all items at once,
        then one warp per item straight into its slot."""
        p = self.parameters(item_uniforms(seeds), *images.shape[1:3])
        matrices = self.matrices(p)
        for k in range(len(images)):
            self._transform(images[k], p, k, matrices[k], out[k])
            self._colour(out[k], float(p["contrast"][k]), float(p["brightness"][k]))
        return out


def train_augmentation(size: int, strength: str = "light") -> FusedAugment | None:
    if strength == "none":
        return None
    return FusedAugment(size, strength)


def albumentations_augmentation(size: int, strength: str = "light"):
    """The same augmentation as three albumentations steps (two interpolations)."""
    # imported here, and only here: loaders need only cv2; albumentations is the reference the tests compare with
    A = require("albumentations", "dev", "the albumentations reference pipeline")

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
