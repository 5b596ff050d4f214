"""Image decoding and geometry shared by the 2-D sources."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kdcli.errors import KdcliError
from kdcli.shards.quality import warn

cv2.setNumThreads(1)  # parallelism comes from prepare's worker processes, not from OpenCV threads


def quiet_opencv() -> None:
    """OpenCV prints `[ WARN ]` lines of its own for a truncated or broken image before returning None; kdcli
    says what is wrong in one line naming the file, so only OpenCV's errors are left to print."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


quiet_opencv()  # every source decoding images imports this module (set per process; forked workers inherit it)


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Decode any bit depth to uint8 with `channels` channels (HxWxC). Names the file when it fails."""
    raw = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if raw is None:
        raise KdcliError("listed image does not exist", path=path, hint="fix the list file or restore the image")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise KdcliError("image will not decode (truncated or not an image)", path=path,
                         hint="re-download it or drop it from the list file")
    image = to_uint8(image, path)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if channels == 1 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def to_uint8(image: np.ndarray, path: str | Path = "image") -> np.ndarray:
    """16-bit images are rescaled by their type's range, not per image, so contrast is kept. Float images have
    no type range: values within 0..1 are scaled by 255, values within 0..255 kept; any other range (a float32
    TIFF of 0..1000, negative values) is scaled from the image's own min..max, with a data warning, rather than
    clipped to white. Non-finite pixels are refused."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    original, image = image.dtype, image.astype(np.float32)
    if not np.isfinite(image).all():
        raise KdcliError(f"{int((~np.isfinite(image)).sum())} pixel(s) are NaN or infinite", path=path,
                         hint="re-export the image, or drop it from the list file")
    low, high = float(image.min()), float(image.max())
    if low >= 0.0 and high <= 1.0:
        return (image * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return image.astype(np.uint8)
    warn("image_rescaled", "images without a fixed range (float or signed pixels) beyond 0..255, scaled from "
         "their own min..max to 0..255", f"{path} ({original}, {low:g}..{high:g})")
    return np.round((image - low) / max(high - low, 1e-12) * 255.0).astype(np.uint8)


def pad_to_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    padded = np.zeros((side, side, image.shape[2]), dtype=image.dtype)
    padded[top : top + height, left : left + width] = image
    return padded


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad to square (as MultiEYE did offline), then resize to size x size."""
    square = pad_to_square(image)
    if square.shape[0] != size:
        interpolation = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_CUBIC
        square = cv2.resize(square, (size, size), interpolation=interpolation)
    return square if square.ndim == 3 else square[:, :, None]


def preprocess_photo(path: str | Path, size: int) -> np.ndarray:
    """One raw RGB photo as a photo source stores it (`kdcli predict` calls this too): decoded to RGB uint8,
    zero-padded to square, resized."""
    return resize_square(read_image(path, 3), size)


def resize_square_step(size: int) -> str:
    """resize_square in words, for the preprocessing contract `kdcli export` writes."""
    return f"zero-pad to a centred square, resize to {size}x{size} (cv2 INTER_AREA down, INTER_CUBIC up)"


def clahe_rgb(image: np.ndarray, clip_limit: float = 2.0, grid: int = 8) -> np.ndarray:
    """CLAHE on the L channel of Lab, the usual fundus enhancement."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(grid, grid))
    lab[:, :, 0] = clahe.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def median_filter(image: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Speckle suppression for OCT B-scans."""
    filtered = cv2.medianBlur(image, kernel)
    return filtered if filtered.ndim == 3 else filtered[:, :, None]
