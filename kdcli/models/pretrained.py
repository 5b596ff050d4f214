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
rather than skipped: a partly loaded backbone would train on silently. For the same reason a partial load (a
model tensor the file lacks, or a file tensor with no place in the model besides the source's classifier) is an
error unless `--allow-partial`; the log line always lists both.

`--pretrained NAME` (a timm name, with or without its tag: resnet18.a1_in1k, or hf-hub:ORG/REPO) is looked up
in the local caches only, as timm itself would have stored it: the Hugging Face hub cache ($HF_HUB_CACHE,
~/.cache/huggingface/hub) and torch hub's (~/.cache/torch/hub/checkpoints). Nothing is downloaded, so an
offline node (HF_HUB_OFFLINE=1) resolves it when it is cached and says how to fetch it when it is not."""

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


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order of preference
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "head_dist.")  # a source's own classifier


def is_model_name(spec: str) -> bool:
    """A timm name (resnet18.a1_in1k) or hf-hub:ORG/REPO rather than a file path."""
    if spec.startswith("hf-hub:"):
        return True
    return "/" not in spec and "\\" not in spec and not spec.lower().endswith(WEIGHT_SUFFIXES)


def resolve_weights(spec: str | Path) -> tuple[Path, str | None]:
    """(local file, the architecture it is for when known) for a --pretrained value: a file as given, or a timm
    name / hf-hub id found in the local caches."""
    path = Path(spec).expanduser()
    if path.is_file() or not is_model_name(str(spec)):
        return path, None
    name = str(spec)
    repo, files, urls, architecture = _candidates(name)
    found = _cached(repo, files, urls)
    if found is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        fetch = f"hf download {repo}" if repo else f"python -c \"import timm; timm.create_model('{name}', " \
                                                    "pretrained=True)\""
        raise KdcliError(f"--pretrained {name}: not in the local caches ({HF_HUB_CACHE}, "
                         f"{Path(torch.hub.get_dir()) / 'checkpoints'}); kdcli downloads nothing",
                         hint=f"fetch it once where there is a network ({fetch}) and copy the cache over, or "
                              "pass a weights file")
    return found, architecture


def _candidates(name: str) -> tuple[str | None, list[str], list[str], str | None]:
    """(hub repo, file names in it, legacy download URLs, architecture) for a timm name or hf-hub id."""
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:"), list(HF_FILES), [], None
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown tag of a known architecture
        raise KdcliError(f"--pretrained {name}: {exc}", hint="`timm.list_pretrained('ARCH*')` lists the tags; "
                         "or pass a weights file") from None
    if cfg is None:
        raise KdcliError(f"--pretrained {name}: neither a file nor a timm model name",
                         hint="pass a local .pth/.safetensors file, a timm name such as resnet18.a1_in1k, or "
                              "hf-hub:ORG/REPO")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(HF_FILES)
    return cfg.hf_hub_id, files, [cfg.url] if cfg.url else [], cfg.architecture


def _cached(repo: str | None, files: list[str], urls: list[str]) -> Path | None:
    from urllib.parse import urlparse

    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in files:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    for url in urls:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if legacy.is_file():
            return legacy
    return None


def check_architecture(spec: str | Path, architecture: str | None, model_architecture: str) -> None:
    """A named checkpoint is for one architecture: refuse it for another before loading a single tensor."""
    if architecture and architecture != model_architecture:
        raise KdcliError(f"--pretrained {spec} holds {architecture} weights; the model is {model_architecture}",
                         hint=f"pass --model {architecture}, or weights for {model_architecture}")


def check_complete(left: list[str], unused: list[str], path: str | Path, architecture: str,
                   allow_partial: bool) -> None:
    """Refuse a partial load unless allowed: a model tensor the file lacks, or a file tensor with no place in the
    model other than its classifier (which a backbone never has). BatchNorm's step counters do not count."""
    missing = [k for k in left if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unused if not k.startswith(CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")]
    if (missing or unexpected) and not allow_partial:
        raise KdcliError(f"partial load: {len(missing)} model tensors missing from the file ({listed(missing)}), "
                         f"{len(unexpected)} unexpected file tensors ({listed(unexpected)})", path=path,
                         hint=f"weights must be for {architecture}; --allow-partial trains with the missing ones as "
                              "initialised")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise KdcliError("pretrained weights not found", path=path,
                         hint="give a local .pth/.safetensors file, or a timm name such as resnet18.a1_in1k")
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


def load_into(module: nn.Module, spec: str | Path, architecture: str, allow_partial: bool = False,
              log=None) -> list[str]:
    """Copy matching tensors of the weights `spec` names (a file, or a cached timm name; a FLAIR file: its
    backbone) into `module`; returns the module's keys left as initialised (refused unless `allow_partial`).
    `log` gets the line saying what loaded."""
    path, named_architecture = resolve_weights(spec)
    check_architecture(spec, named_architecture, architecture)
    left, unused = load_state(module, read_weights(path), path, architecture)
    check_complete(left, unused, path, architecture, allow_partial)
    if log is not None:
        log(load_report(spec, path, len(module.state_dict()) - len(left), left, unused))
    return left


def load_report(spec: str | Path, path: Path, loaded: int, left: list[str], unused: list[str],
                flair: bool = False) -> str:
    """The one log line of a --pretrained load: what it resolved to, and the missing and unexpected keys."""
    source = f"{spec} ({path})" if str(spec) != str(path) else str(spec)
    return (f"--pretrained {source}: {'FLAIR checkpoint, ' if flair else ''}backbone {loaded} tensors loaded, "
            f"left as initialised: {listed(left)}, unused from the file: {listed(unused)}")


def listed(keys: list[str], shown: int = 3) -> str:
    """'a, b, c (+4 more)' for one log line."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
