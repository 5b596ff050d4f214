"""`--pretrained PATH`: local weights only (nothing is downloaded), copied into a module by name.

Accepted: a state dict or a checkpoint dict holding one under 'state_dict' or 'model' (.pth/.pt), or
.safetensors; DDP's 'module.' prefixes; timm's feature-extractor names, which flatten `stages.0` into
`stages_0` (U-Net encoders load classification weights); and a first convolution made for another number of
input channels, adapted as timm adapts ImageNet weights for in_chans != 3 (1-channel OCT, 4 MRI sequences)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from kdcli.errors import KdcliError

_FLATTENED = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)\.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise KdcliError("pretrained weights not found", path=path, hint="give a local .pth/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled code, truncated file: either way not weights we can read
            raise KdcliError(f"cannot read weights ({type(exc).__name__})", path=path,
                             hint="save a plain state dict (torch.save(model.state_dict(), PATH))") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise KdcliError("not a state dict", path=path, hint="save torch.save(model.state_dict(), PATH)")
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def load_into(module: nn.Module, path: str | Path, architecture: str) -> list[str]:
    """Copy matching tensors of the file at `path` into `module`; returns the module's keys left as initialised.
    Refuses a file of which nothing matches (weights for another architecture)."""
    state = read_state_dict(path)
    target = module.state_dict()
    first_conv = next((key for key, value in target.items() if value.ndim == 4), None)
    usable = {}
    for key, wanted in target.items():
        source = state.get(key)
        if source is None:
            source = state.get(_FLATTENED.sub(r"\1.\2.", key))
        if source is None:
            continue
        if key == first_conv and source.ndim == 4 and source.shape[1] != wanted.shape[1] \
                and (source.shape[0], *source.shape[2:]) == (wanted.shape[0], *wanted.shape[2:]):
            from timm.models import adapt_input_conv

            source = adapt_input_conv(wanted.shape[1], source)
        if source.shape == wanted.shape:
            usable[key] = source
    if not usable:
        raise KdcliError("no tensor in the file matches the model", path=path,
                         hint=f"weights must be for {architecture}")
    module.load_state_dict(usable, strict=False)
    return sorted(set(target) - set(usable))
