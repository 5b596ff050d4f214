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


def test_a_tensor_of_another_shape_is_refused_not_skipped(tmp_path):
    donor, path = donor_file(tmp_path, "test_resnet")
    donor["layer1.0.conv1.weight"] = donor["layer1.0.conv1.weight"][:, :, :1, :1].clone()  # a 1x1 where 3x3 is
    torch.save(donor, tmp_path / "other.pth")
    with pytest.raises(KdcliError, match=r"layer1\.0\.conv1\.weight has shape \(\d+, \d+, 1, 1\), the model's "
                                         r"layer1\.0\.conv1\.weight has \(\d+, \d+, 3, 3\)"):
        load_into(timm.create_model("test_resnet", num_classes=0), tmp_path / "other.pth", "test_resnet")


# ------------------------------------------------------------------ FLAIR (jusiro/FLAIR) checkpoints
FLAIR_PROJECTION = "vision_model.projection_head_vision.projection.weight"


def flair_file(tmp_path, projection_shape=(16, 96)) -> tuple[dict, torch.Tensor, str]:
    """A FLAIRModel.state_dict() in miniature: the vision ResNet (fc removed) under vision_model.model., its
    bias-free projection, and a text tower that kdcli leaves alone."""
    torch.manual_seed(2)
    vision = timm.create_model("test_resnet", num_classes=0, in_chans=3).state_dict()
    projection = torch.randn(projection_shape)
    state = {f"vision_model.model.{k}": v for k, v in vision.items()}
    state[FLAIR_PROJECTION] = projection
    state["text_model.projection_head_text.projection.weight"] = torch.randn(projection_shape[0], 768)
    state["logit_scale"] = torch.tensor(2.66)
    path = tmp_path / "flair.pth"
    torch.save(state, path)
    return vision, projection, str(path)


def test_torchvision_resnet50_names_and_shapes_are_timm_resnet50s():
    """FLAIR's vision_model.model is torchvision's resnet50 with fc = Identity; it loads into timm's resnet50
    by name only because the two agree on every key and shape."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        flair_vision = torchvision.models.resnet50()
        flair_vision.fc = torch.nn.Identity()
        ours = timm.create_model("resnet50", num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in flair_vision.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def flair_config(shards, tmp_path, path, text_path, head="concept"):
    from kdcli.train import resolve_config

    return resolve_config({"data": str(shards), "modality": "fundus", "model": "test_resnet", "head": head,
                           "workers": 0, "out": str(tmp_path / "m.pt"), "pretrained": path,
                           "concept_embeddings": str(text_path)})


def test_flair_checkpoint_fills_the_backbone_and_the_concept_projection(multieye_shards, tmp_path):
    import numpy as np

    from kdcli.shards.reader import ShardStore
    from kdcli.train import build_student

    vision, projection, path = flair_file(tmp_path)
    store = ShardStore(multieye_shards)
    text = np.random.default_rng(0).standard_normal((len(store.meta.extra["concepts"]), 16)).astype(np.float32)
    np.save(tmp_path / "text.npy", text)  # the text tower's concept embeddings
    lines: list[str] = []
    model = build_student(flair_config(multieye_shards, tmp_path, path, tmp_path / "text.npy"), store, "fundus",
                          log=lines.append)
    backbone = model.backbone.state_dict()
    assert set(backbone) == set(vision) and all(torch.equal(backbone[k], v) for k, v in vision.items())
    assert torch.equal(model.head.embed.weight, projection)  # FLAIR's W_v, not a fresh one
    unit_text = torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))
    assert torch.allclose(model.head.concepts, unit_text)
    assert len(lines) == 1 and "FLAIR checkpoint" in lines[0] and "left as initialised: none" in lines[0]
    assert "(16, 96) -> concept head" in lines[0] and "2 other tensors" in lines[0]
    linear = build_student(flair_config(multieye_shards, tmp_path, path, tmp_path / "text.npy", head="linear"),
                           store, "fundus", log=lines.append)
    assert torch.equal(linear.backbone.state_dict()["layer1.0.conv1.weight"], vision["layer1.0.conv1.weight"])
    assert "projection not used (linear head)" in lines[1]


def test_a_flair_projection_that_does_not_fit_is_refused_in_one_line(multieye_shards, tmp_path):
    import numpy as np
    from conftest import FAST, kdcli_run
    from test_prepare_multieye import assert_one_line_error

    from kdcli.shards.reader import ShardStore

    count = len(ShardStore(multieye_shards).meta.extra["concepts"])

    def teach(path, dim):
        np.save(tmp_path / "text.npy", np.ones((count, dim), dtype=np.float32))
        return kdcli_run("teach", "--data", str(multieye_shards), "--modality", "fundus",
                         "--head", "concept", "--pretrained", path, "--concept-embeddings",
                         str(tmp_path / "text.npy"), "--out", str(tmp_path / "m.pt"), *FAST, ok=False)

    _, _, path = flair_file(tmp_path, projection_shape=(16, 50))  # made for a backbone of 50 features
    assert_one_line_error(teach(path, 16), "flair.pth", FLAIR_PROJECTION, "(16, 50)", "(16, 96)", "50 features")
    _, _, path = flair_file(tmp_path)  # fits the backbone, but the text embeddings are 8-d, not 16-d
    assert_one_line_error(teach(path, 8), "flair.pth", FLAIR_PROJECTION, "(16, 96)", "(8, 96)", "D = 16")
