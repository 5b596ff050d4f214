"""What every `kdcli explain` variant shares: its options, the panels (Grad-CAM on an image, upscaled for
reading), the PNG and report writers and the option checks. The variants (explain.run for classification,
explain.gaze, explain.segmentation, explain.slides) import this; explain.run dispatches to them, so the shared
pieces live here and not in run.py, which would make a circle."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from kdcli.errors import KdcliError, UsageError
from kdcli.models.classifier import Classifier
from kdcli.shards.format import atomic_write_bytes

SPLITS = ("train", "dev", "test")
MIN_SIDE = 192  # phantoms are 32-128 px: too small to read a heat map without upscaling
GAP = 6


@dataclass
class ExplainOptions:
    checkpoint: Path
    data: Path | None  # None: the dataset the checkpoint records
    out: Path
    split: str = "test"
    count: int = 12
    top_concepts: int = 5
    device: str = "auto"
    batch_size: int = 32
    overwrite: bool = False  # replace an earlier explain folder at `out` (as a whole, once the new one is done)


def head_logits(out: dict[str, Any], head: str | None) -> torch.Tensor:
    return out["task_logits"][head] if head else out["logits"]


class LogitsOnly(nn.Module):
    """pytorch_grad_cam calls the model and indexes the result as a logits tensor; ours returns a dict."""

    def __init__(self, model: Classifier, head: str | None = None):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model(images), self.head)


def pick_indices(labels: np.ndarray, count: int) -> list[int]:
    """Round-robin over classes (or any group code, e.g. (grade, task)), first images of each class first:
    deterministic, and every class shows up once count reaches the number of classes present."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picks: list[int] = []
    for rank in range(max((len(m) for m in by_class), default=0)):
        for members in by_class:
            if rank < len(members):
                picks.append(int(members[rank]))
            if len(picks) == count:
                return picks
    return picks


def predict(model: Classifier, images: torch.Tensor, device: torch.device, batch_size: int,
            heads: list[str | None] | None = None) -> tuple[list[np.ndarray], np.ndarray | None, tuple[int, int]]:
    """Probabilities of each head in `heads` (default: the model's logits), concept similarities (None for
    linear heads) and the CAM layer's grid size."""
    heads = heads or [None]
    grids: list[tuple[int, int]] = []
    hook = model.feature_map.register_forward_hook(lambda _m, _i, out: grids.append(tuple(out.shape[-2:])))
    probs: list[list[np.ndarray]] = [[] for _ in heads]
    sims = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                out = model(images[start:start + batch_size].to(device))
                for chunks, head in zip(probs, heads, strict=True):
                    chunks.append(head_logits(out, head).float().softmax(1).cpu().numpy())
                if "sims" in out:
                    sims.append(out["sims"][:, 0].float().cpu().numpy())
    finally:
        hook.remove()
    return [np.concatenate(p) for p in probs], (np.concatenate(sims) if sims else None), grids[0]


def grad_cams(model: Classifier, images: torch.Tensor, targets: list[int], device: torch.device,
              batch_size: int = 32, head: str | None = None) -> np.ndarray:
    """(N, H, W) Grad-CAM maps in [0, 1] for uint8 NCHW `images`, one target class per image, of the model's
    logits or of one task head of a multi-head model."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    with GradCAM(model=LogitsOnly(model, head).eval(), target_layers=[model.feature_map]) as cam:
        for start in range(0, len(images), batch_size):
            # Float in [0, 1]: Classifier.normalise rescales uint8 only, and autograd needs floats anyway.
            chunk = images[start:start + batch_size].to(device).float().div(255.0)
            chunk_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]]
            maps.append(cam(input_tensor=chunk, targets=chunk_targets))
    model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """CHW uint8 with 1, 3 or other channel counts -> HWC RGB uint8 (first channel as grey otherwise)."""
    hwc = image.transpose(1, 2, 0)
    return hwc if hwc.shape[2] == 3 else np.repeat(hwc[:, :, :1], 3, axis=2)


def render_panel(image: np.ndarray, cams: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Original | overlay [| overlay ...] (one (H, W) map, or one per head), upscaled by a whole factor:
    nearest for the pixels (shows what the model saw), bilinear for the heat maps (already a smooth
    upsampling of the coarse grid)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if isinstance(cams, np.ndarray) and cams.ndim == 2:
        cams = [cams]
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / min(height, width)))
    size = (width * scale, height * scale)
    big = cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST)
    gap = np.full((size[1], GAP, 3), 255, np.uint8)
    parts = [big]
    for cam in cams:
        big_cam = np.clip(cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
        parts += [gap, show_cam_on_image(big.astype(np.float32) / 255.0, big_cam, use_rgb=True)]
    return np.concatenate(parts, axis=1)


def safe_name(sample_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:60]
    return name or "image"


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise KdcliError("cannot encode PNG", path=path)
    atomic_write_bytes(path, encoded.tobytes())


def top_concepts(sims: np.ndarray | None, names: list[str], k: int) -> list[dict[str, Any]]:
    if sims is None or k <= 0:
        return []
    order = np.argsort(-sims, kind="stable")[:k]
    return [{"name": names[i], "similarity": round(float(sims[i]), 4)} for i in order]


def grid_warning(grid: tuple[int, int] | list[int], spec: dict[str, Any]) -> str | None:
    """A Grad-CAM layer of 2x2 cells or fewer cannot say where in the image the evidence is: the overlay is a
    blur over a quadrant or the whole image. Dilating the backbone's last stages (--output-stride) keeps a
    finer map at the same image size; the advice names the strides this model does not use yet."""
    if max(grid) > 2:
        return None
    stride = int((spec.get("backbone_kwargs") or {}).get("output_stride") or 32)
    finer = {32: "retrain with --output-stride 16 (or 8) for a finer map, or use larger images",
             16: "retrain with --output-stride 8 for a finer map, or use larger images"}
    return (f"the Grad-CAM layer is only {grid[0]}x{grid[1]} at this image size, so the heat maps cannot localise; "
            + finer.get(stride, "use larger images"))


def write_report(out: Path, report: dict[str, Any], html_page: str) -> Path:
    """explain.json, then index.html: the page is written last, so it only ever points at finished files."""
    atomic_write_bytes(out / "explain.json", (json.dumps(report, indent=2) + "\n").encode())
    index = out / "index.html"
    atomic_write_bytes(index, html_page.encode())
    return index


def check_options(options: ExplainOptions) -> Path:
    if options.split not in SPLITS:
        raise UsageError(f"--split {options.split!r}: use train, dev or test")
    if options.count < 1:
        raise UsageError(f"--count {options.count}: explain at least one image")
    if options.top_concepts < 0:
        raise UsageError(f"--top-concepts {options.top_concepts}: use 0 or more")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    return out
