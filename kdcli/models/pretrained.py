"""`--pretrained PATH`: local weights only (nothing is downloaded), copied into a module by name.

Accepted: a state dict or a checkpoint dict holding one under 'state_dict' or 'model' (.pth/.pt), or
.safetensors; DDP's 'module.' prefixes; timm's feature-extractor names, which flatten `stages.0` into
`stages_0` (U-Net encoders load classification weights); and a first convolution made for another number of
input channels, adapted as timm adapts ImageNet weights for in_chans != 3 (1-channel OCT, 4 MRI sequences).

FLAIR checkpoints (jusiro/FLAIR, the image-text model OCT-CoDA starts from) are recognised by their
`vision_model.model.*` keys: that is a torchvision ResNet-50 without its fc, whose names and shapes are timm
`resnet50`'s, so it fills the backbone as it stands; `vision_model.projection_head_vision.projection.weight`
(2048 -> 512, no bias) is the image-to-joint-space projection, which a concept head takes as its W_v
(kdcli.models.classifier.load_pretrained_weights). The text tower (`text_model.*`, `logit_scale`) is not
used: its concept embeddings come as an array through `--concept-embeddings`. MultiEYE's fine-tuned models
wrap the same names in `flair_model.`, which is removed like `module.`.

A tensor found by name with another shape is refused (one line naming the file, the key and both shapes)
rather than skipped: a partly loaded backbone would train on silently."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from kdcli.errors import KdcliError

_FLATTENED = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)\.")
_WRAPPERS = ("module.", "flair_model.")  # DDP; MultiEYE's FLAIRConceptClassifier / FLAIRMultiLayer
FLAIR_BACKBONE = "vision_model.model."
FLAIR_PROJECTION = "vision_model.projection_head_vision.projection."


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
    return {_unwrap(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _unwrap(key: str) -> str:
    for prefix in _WRAPPERS:
        key = key.removeprefix(prefix)
    return key


@dataclasses.dataclass
class Weights:
    """What a file offers: the backbone's tensors (names relative to the backbone) and, for FLAIR, the
    vision projection's."""

    backbone: dict[str, torch.Tensor]
    projection: dict[str, torch.Tensor]
    flair: bool
    others: list[str]  # file keys that belong to neither (FLAIR's text tower)

    @property
    def backbone_prefix(self) -> str:
        return FLAIR_BACKBONE if self.flair else ""


def split_weights(state: dict[str, torch.Tensor]) -> Weights:
    if not any(key.startswith(FLAIR_BACKBONE) for key in state):
        return Weights(state, {}, False, [])
    backbone = {k.removeprefix(FLAIR_BACKBONE): v for k, v in state.items() if k.startswith(FLAIR_BACKBONE)}
    projection = {k.removeprefix(FLAIR_PROJECTION): v for k, v in state.items() if k.startswith(FLAIR_PROJECTION)}
    others = sorted(k for k in state if not k.startswith((FLAIR_BACKBONE, FLAIR_PROJECTION)))
    return Weights(backbone, projection, True, others)


def read_weights(path: str | Path) -> Weights:
    return split_weights(read_state_dict(path))


def load_state(module: nn.Module, weights: Weights, path: str | Path, architecture: str) -> tuple[list[str], list[str]]:
    """Copy the backbone tensors of `weights` into `module` by name; returns (module keys left as initialised,
    file keys not used). Refuses a file of which nothing matches, and any matching name of another shape."""
    state, prefix = weights.backbone, weights.backbone_prefix
    target = module.state_dict()
    first_conv = next((key for key, value in target.items() if value.ndim == 4), None)
    usable, used = {}, set()
    for key, wanted in target.items():
        source_key = key if key in state else _FLATTENED.sub(r"\1.\2.", key)
        source = state.get(source_key)
        if source is None:
            continue
        if key == first_conv and source.ndim == 4 and source.shape[1] != wanted.shape[1] \
                and (source.shape[0], *source.shape[2:]) == (wanted.shape[0], *wanted.shape[2:]):
            from timm.models import adapt_input_conv

            source = adapt_input_conv(wanted.shape[1], source)
        if source.shape != wanted.shape:
            raise KdcliError(f"{prefix}{source_key} has shape {tuple(source.shape)}, the model's "
                             f"{key} has {tuple(wanted.shape)}", path=path, hint=f"weights must be for {architecture}")
        usable[key] = source
        used.add(source_key)
    if not usable:
        raise KdcliError("no tensor in the file matches the model", path=path,
                         hint=f"weights must be for {architecture}")
    module.load_state_dict(usable, strict=False)
    return sorted(set(target) - set(usable)), sorted(set(state) - used)


def load_into(module: nn.Module, path: str | Path, architecture: str) -> list[str]:
    """Copy matching tensors of the file at `path` (a FLAIR file: its backbone) into `module`; returns the
    module's keys left as initialised."""
    return load_state(module, read_weights(path), path, architecture)[0]


def listed(keys: list[str], shown: int = 3) -> str:
    """'a, b, c (+4 more)' for one log line."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
