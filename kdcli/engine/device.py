"""Pick the device and the precision once, so every command behaves the same on a laptop and a GPU node."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from kdcli.errors import UsageError


def select_device(requested: str | None = "auto") -> torch.device:
    requested = requested or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


def amp_dtype(device: torch.device, setting: str = "auto") -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); never on CPU unless asked for."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if setting in ("fp16", "auto"):
        return torch.float16
    raise UsageError(f"--amp {setting!r}: use auto, off, bf16 or fp16")


def deterministic_mode(device: torch.device, setting: str = "auto") -> bool:
    """Deterministic kernels where they cost nothing (CPU), cudnn's autotuned ones on GPUs, as timm and
    nnU-Net train; `--set deterministic=on` buys bitwise repeats on a GPU with speed."""
    if setting not in ("auto", "on", "off"):
        raise UsageError(f"--set deterministic={setting}: use auto, on or off")
    return setting == "on" or (setting == "auto" and device.type != "cuda")


def seed_everything(seed: int, deterministic: bool | None = True) -> None:
    """Seed every generator; `deterministic` also picks the kernels (None leaves that choice alone)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic is not None:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not deterministic
