"""2D U-Net for slice segmentation. Returns the last decoder features and the logits, so pixel-wise methods
(ProtoKD's prototype maps) reach the features the 1x1 output convolution sees.

Encoders: "plain" (ProtoKD's V-Net in 2D: `base` filters doubling over 4 downsamplings, BatchNorm) or any timm
model that supports `features_only` (e.g. resnet18, efficientnet_b0); inputs are z-scored MRI channels, so
there is no normalisation inside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import KdcliError


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PlainEncoder(nn.Module):
    """Feature maps at strides 1, 2, 4, ... 2**depth with base, 2*base, ... channels."""

    def __init__(self, in_chans: int, base: int, depth: int):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.channels = widths
        self.stages = nn.ModuleList([conv_block(in_chans, widths[0])] + [
            nn.Sequential(nn.MaxPool2d(2), conv_block(widths[i - 1], widths[i])) for i in range(1, depth + 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class TimmEncoder(nn.Module):
    def __init__(self, name: str, in_chans: int):
        super().__init__()
        import timm

        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
        except (RuntimeError, TypeError) as exc:
            raise KdcliError(f"timm model {name!r} cannot serve as a U-Net encoder ({exc})",
                             hint="use --model plain, or a timm CNN such as resnet18") from None
        self.channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


class UNet(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        base = spec.get("base", 16)
        if spec["backbone"] == "plain":
            self.encoder: nn.Module = PlainEncoder(spec["in_chans"], base, spec.get("depth", 4))
        else:
            self.encoder = TimmEncoder(spec["backbone"], spec["in_chans"])
        channels = self.encoder.channels
        # decoder stage i: the upsampled deeper map concatenated with skip i -> skip i's width
        self.decoder = nn.ModuleList(conv_block(channels[i + 1] + channels[i], channels[i])
                                     for i in reversed(range(len(channels) - 1)))
        # timm encoders start at stride 2 or 4: one more block brings the features to full resolution
        plain = spec["backbone"] == "plain"
        self.final = nn.Identity() if plain else conv_block(channels[0], base)
        self.head = nn.Conv2d(channels[0] if plain else base, spec["num_classes"], 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.encoder(images)
        x = maps[-1]
        for block, skip in zip(self.decoder, reversed(maps[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        if x.shape[-2:] != images.shape[-2:]:
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        features = self.final(x)
        return {"features": features, "logits": self.head(features)}
