"""Image classifier = normalisation + timm backbone + head. Returns features and logits so every
method can reach either. The head is `linear` or `concept` (OCT-CoDA's concept-similarity head)."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import KdcliError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_normalisation(in_chans: int) -> tuple[list[float], list[float]]:
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * in_chans, [0.25] * in_chans


class ConceptHead(nn.Module):
    """s = norm(W_v norm(f)) T^T (cosine to each concept), logits = W_c (scale * s) + b; a second similarity
    layer s' = (P f) T^T (unnormalised, as the official `project_4`) is used only by distillation.
    W_v (`embed`) is FLAIR's `projection_head_vision` (norm, Linear without bias, norm), so a FLAIR
    checkpoint's projection loads into it."""

    def __init__(self, in_features: int, concepts: torch.Tensor, num_classes: int, scale: float = 1.0):
        super().__init__()
        # The official classifier sees the cosines as they are (scale 1). A larger fixed scale only
        # re-parameterises W_c, multiplying its effective step under Adam: 100 epochs x 562 steps (the
        # official recipe) do not need it, a few hundred steps from scratch do (`--concept-scale`, the demo).
        self.scale = scale
        self.register_buffer("concepts", concepts.float())
        dim = concepts.shape[1]
        self.embed = nn.Linear(in_features, dim, bias=False)
        self.project = nn.Linear(in_features, dim)
        self.classifier = nn.Linear(concepts.shape[0], num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        visual = F.normalize(self.embed(F.normalize(features, dim=-1)), dim=-1)
        sims = visual @ self.concepts.t()
        sims_projected = self.project(features) @ self.concepts.t()
        return {"logits": self.classifier(self.scale * sims), "sims": torch.stack([sims, sims_projected], dim=1)}


class Classifier(nn.Module):
    def __init__(self, spec: dict[str, Any], concepts: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        in_chans, num_classes = spec["in_chans"], spec["num_classes"]
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, -1, 1, 1))
        try:
            self.backbone = timm.create_model(spec["backbone"], pretrained=False, num_classes=0,
                                              in_chans=in_chans, **spec.get("backbone_kwargs", {}))
        except (RuntimeError, TypeError, AssertionError) as exc:  # unknown name; an option the model lacks
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KdcliError(f"cannot build timm model {spec['backbone']!r} ({reason})",
                             hint="check the name (`python -c 'import timm; print(timm.list_models())'`) and that "
                                  "the model takes the options given (e.g. --output-stride)") from None
        self.feature_map = nn.Identity()  # Grad-CAM's target: the last spatial feature map
        features = self.backbone.num_features
        if spec["head"] == "concept":
            if concepts is None:
                concepts = torch.zeros(len(spec["concepts"]), spec["concept_dim"])
            self.head: nn.Module = ConceptHead(features, concepts, num_classes,
                                                  spec.get("concept_scale", 1.0))
        elif spec["head"] == "linear":
            self.head = nn.Linear(features, num_classes)
        elif spec["head"] == "multi":  # one linear head per task (SALL: DR and AMD grades on one backbone)
            self.head = nn.ModuleDict({task: nn.Linear(features, n) for task, n in spec["tasks"].items()})
        else:
            raise KdcliError(f"unknown head {spec['head']!r}; known: linear, concept, multi")

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.feature_map(self.backbone.forward_features(self.normalise(images)))
        features = self.backbone.forward_head(feature_map, pre_logits=True)
        if isinstance(self.head, ConceptHead):
            return {"features": features, **self.head(features)}
        if isinstance(self.head, nn.ModuleDict):
            task_logits = {task: head(features) for task, head in self.head.items()}
            return {"features": features, "task_logits": task_logits, "logits": next(iter(task_logits.values()))}
        return {"features": features, "logits": self.head(features)}


def load_pretrained_weights(model: Classifier, spec: str, allow_partial: bool = False) -> tuple[str, bool]:
    """--pretrained: the backbone's weights from a local file (or a timm name found in the local caches) and,
    from a FLAIR checkpoint, the vision projection into a concept head's W_v (see kdcli.models.pretrained).
    A partial load is refused unless `allow_partial`. Returns one line for the log (what loaded, what was left
    as initialised, what in the file went unused) and whether the projection loaded."""
    from kdcli.models.pretrained import (
        check_architecture,
        check_complete,
        listed,
        load_report,
        load_state,
        read_weights,
        resolve_weights,
    )

    path, named_architecture = resolve_weights(spec)
    check_architecture(spec, named_architecture, model.spec["backbone"])
    weights = read_weights(path)
    left, unused = load_state(model.backbone, weights, path, model.spec["backbone"])
    check_complete(left, unused, path, model.spec["backbone"], allow_partial)
    projection_loaded = False
    parts = [load_report(spec, path, len(model.backbone.state_dict()) - len(left), left, unused, weights.flair)]
    if weights.projection:
        if isinstance(model.head, ConceptHead):
            _load_projection(model.head, weights.projection, path)
            projection_loaded = True
            parts.append(f"projection {tuple(model.head.embed.weight.shape)} -> concept head")
        else:
            parts.append(f"projection not used ({model.spec['head']} head)")
    if weights.others:
        parts.append(f"not used: {len(weights.others)} other tensors, the text tower ({listed(weights.others, 2)})")
    return "; ".join(parts), projection_loaded


def _load_projection(head: ConceptHead, projection: dict[str, torch.Tensor], path: str) -> None:
    from kdcli.models.pretrained import FLAIR_PROJECTION

    extra = sorted(set(projection) - {"weight"})
    if extra:
        raise KdcliError(f"{FLAIR_PROJECTION}{extra[0]} has no place in the concept head (its W_v has no bias)",
                         path=path, hint="FLAIR's default projection is bias-free (proj_bias=False)")
    source, wanted = projection.get("weight"), head.embed.weight
    if source is None:
        raise KdcliError(f"{FLAIR_PROJECTION}weight missing", path=path)
    if source.shape != wanted.shape:
        what = (f"the concept embeddings (--concept-embeddings; distill: the teacher's) must have D = "
                f"{source.shape[0]}, the projection's output"
                if source.shape[0] != wanted.shape[0] else
                f"the backbone must have {source.shape[1]} features (FLAIR's is resnet50)")
        raise KdcliError(f"{FLAIR_PROJECTION}weight has shape {tuple(source.shape)}, the concept head's W_v "
                         f"{tuple(wanted.shape)} (out = concept dimension D, in = backbone features)",
                         path=path, hint=what)
    with torch.no_grad():
        wanted.copy_(source)


def build_classifier(spec: dict[str, Any], concepts: torch.Tensor | None = None) -> Classifier:
    return Classifier(spec, concepts)
