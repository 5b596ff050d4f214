"""A trained model back from its checkpoint: the architecture its meta records (classifier, CVI, MIL, U-Net),
with the checkpoint's weights, in eval mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kdcli.errors import KdcliError
from kdcli.models.classifier import Classifier

if TYPE_CHECKING:
    from kdcli.engine.checkpoint import Checkpoint


def load_model(checkpoint: Checkpoint) -> torch.nn.Module:
    arch = checkpoint.meta["model"].get("arch")
    if arch == "unet":
        from kdcli.models.unet import UNet

        return load_weights(UNet(checkpoint.meta["model"]), checkpoint)
    if arch == "cvi":
        from kdcli.models.cvi import CVIClassifier

        model = CVIClassifier(checkpoint.meta["model"])
    elif arch == "mil":
        from kdcli.models.mil import MILClassifier

        model = MILClassifier(checkpoint.meta["model"])
    else:
        model = Classifier(checkpoint.meta["model"])
    return load_weights(model, checkpoint)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> torch.nn.Module:
    """The checkpoint's weights into the model its meta describes, in eval mode; a mismatch is a damaged file."""
    try:
        model.load_state_dict(checkpoint.model)
    except RuntimeError as exc:
        raise KdcliError(f"weights do not fit the recorded architecture ({str(exc).splitlines()[0]})",
                         path=checkpoint.path, hint="the checkpoint is damaged; retrain") from None
    return model.eval()
