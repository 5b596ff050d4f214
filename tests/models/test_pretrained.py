"""--pretrained fills classifiers, U-Net encoders and slide encoders from a local file: names as timm saves
them (flattened in feature extractors), input convolutions adapted to 1 or 4 channels, nothing matching
refused."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import adapt_input_conv

from kdcli.errors import KdcliError, UsageError
from kdcli.models.pretrained import load_into
from kdcli.models.unet import UNet


def donor_file(tmp_path, name: str) -> tuple[dict, str]:
    torch.manual_seed(1)
    state = timm.create_model(name, num_classes=0, in_chans=3).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # as a DDP run saves it
    return state, str(path)


def test_unet_encoder_takes_classification_weights_with_four_input_channels(tmp_path):
    donor, path = donor_file(tmp_path, "test_resnet")
    unet = UNet({"arch": "unet", "backbone": "test_resnet", "in_chans": 4, "num_classes": 4, "base": 16})
    left = load_into(unet.encoder.body, path, "test_resnet")
    encoder = unet.encoder.body.state_dict()
    assert left == []  # every encoder tensor came from the file
    assert torch.equal(encoder["layer1.0.conv1.weight"], donor["layer1.0.conv1.weight"])
    assert torch.allclose(encoder["conv1.0.weight"], adapt_input_conv(4, donor["conv1.0.weight"]))


def test_flattened_feature_extractor_names_find_their_weights(tmp_path):
    donor, path = donor_file(tmp_path, "test_convnext")
    body = timm.create_model("test_convnext", features_only=True, in_chans=3)
    assert any(k.startswith("stages_0.") for k in body.state_dict())  # timm renames stages.0 here
    load_into(body, path, "test_convnext")
    key = next(k for k in body.state_dict() if k.startswith("stages_0.") and k.endswith("weight"))
    assert torch.equal(body.state_dict()[key], donor[key.replace("stages_0.", "stages.0.", 1)])


def test_one_channel_backbone_gets_the_summed_input_convolution(tmp_path):
    donor, path = donor_file(tmp_path, "test_resnet")
    oct_backbone = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    load_into(oct_backbone, path, "test_resnet")
    assert torch.allclose(oct_backbone.state_dict()["conv1.0.weight"],
                          donor["conv1.0.weight"].sum(dim=1, keepdim=True))


def test_other_architectures_and_unreadable_files_are_refused(tmp_path):
    _, path = donor_file(tmp_path, "test_vit")
    with pytest.raises(KdcliError, match="no tensor in the file matches"):
        load_into(timm.create_model("test_resnet", num_classes=0), path, "test_resnet")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KdcliError, match="cannot read weights"):
        load_into(timm.create_model("test_resnet", num_classes=0), tmp_path / "junk.pth", "test_resnet")


def test_plain_unet_refuses_pretrained_weights(tmp_path):
    from kdcli.segmentation import build_unet
    from kdcli.train import TrainConfig

    class Store:  # build_unet reads the class list only
        class meta:
            classes = ["background", "necrotic", "oedema", "enhancing"]

    with pytest.raises(UsageError, match="plain U-Net"):
        build_unet(TrainConfig(model="plain", pretrained=str(tmp_path / "w.pth")), Store(), ["t1ce"])
