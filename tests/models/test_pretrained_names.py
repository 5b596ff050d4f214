"""`--pretrained NAME`: a timm name resolves from the local Hugging Face (or torch hub) cache, offline; every load
reports missing and unexpected keys, and a partial load is an error unless --allow-partial."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import kdcli_run

from kdcli.errors import KdcliError
from kdcli.models.pretrained import is_model_name, load_into, resolve_weights

NAME = "test_resnet.r160_in1k"  # timm's tiny test network, hosted as timm/test_resnet.r160_in1k


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and torch hub folder of this test's own."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return cache


def cache_weights(cache, state: dict, repo: str = "timm/test_resnet.r160_in1k"):
    """Lay a model.safetensors out as `hf download` leaves it: refs/main -> snapshots/<commit>/."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def imagenet_state() -> dict:
    torch.manual_seed(3)
    return timm.create_model("test_resnet").state_dict()  # with its 1000-class fc, as timm publishes it


def test_names_and_paths_are_told_apart():
    assert is_model_name("resnet18.a1_in1k") and is_model_name("resnet18") and is_model_name("hf-hub:timm/x")
    assert not is_model_name("weights/resnet18.pth") and not is_model_name("w.safetensors")


def test_a_cached_timm_name_loads_offline_and_reports_its_keys(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    donor = imagenet_state()
    file = cache_weights(hub_cache, donor)
    assert resolve_weights(NAME) == (file, "test_resnet")
    assert resolve_weights("test_resnet")[0] == file  # the default tag
    backbone = timm.create_model("test_resnet", num_classes=0)
    lines: list[str] = []
    assert load_into(backbone, NAME, "test_resnet", log=lines.append) == []
    assert torch.equal(backbone.state_dict()["layer1.0.conv1.weight"], donor["layer1.0.conv1.weight"])
    assert lines == [f"--pretrained {NAME} ({file}): backbone {len(backbone.state_dict())} tensors loaded, left as "
                     "initialised: none, unused from the file: fc.bias, fc.weight"]


def test_an_uncached_name_says_how_to_fetch_it(hub_cache):
    with pytest.raises(KdcliError, match=r"--pretrained test_resnet.r160_in1k: not in the local caches .*"
                                         r"kdcli downloads nothing .*\(hf download timm/test_resnet.r160_in1k\)"):
        resolve_weights(NAME)
    with pytest.raises(KdcliError, match="neither a file nor a timm model name"):
        resolve_weights("no_such_network")
    with pytest.raises(KdcliError, match="Invalid pretrained tag"):
        resolve_weights("resnet18.no_such_tag")


def test_a_legacy_torch_hub_download_is_found_too(hub_cache, tmp_path):
    from kdcli.models.pretrained import _cached

    url = "https://example.org/weights/resnet18_a1_0-d63eafa0.pth"
    legacy = tmp_path / "torch-hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"x")
    assert _cached(None, [], [url]) == legacy


def test_weights_named_for_another_network_are_refused(hub_cache):
    cache_weights(hub_cache, imagenet_state())
    with pytest.raises(KdcliError, match="holds test_resnet weights; the model is test_convnext — pass --model "
                                         "test_resnet"):
        load_into(timm.create_model("test_convnext", num_classes=0), NAME, "test_convnext")


def test_a_partial_load_is_an_error_unless_allowed(tmp_path):
    donor = timm.create_model("test_resnet", num_classes=0).state_dict()
    dropped = sorted(k for k in donor if k.startswith("layer4."))
    partial = {k: v for k, v in donor.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    counted = [k for k in dropped if not k.endswith("num_batches_tracked")]  # BatchNorm's step counters aside
    with pytest.raises(KdcliError, match=rf"partial load: {len(counted)} model tensors missing from the file "
                                         r"\(layer4\..*--allow-partial"):
        load_into(timm.create_model("test_resnet", num_classes=0), tmp_path / "partial.pth", "test_resnet")
    lines: list[str] = []
    left = load_into(timm.create_model("test_resnet", num_classes=0), tmp_path / "partial.pth", "test_resnet",
                     allow_partial=True, log=lines.append)
    assert left == dropped and f"(+{len(dropped) - 3} more)" in lines[0]
    torch.save({**donor, "extra_block.weight": torch.ones(3)}, tmp_path / "extra.pth")
    with pytest.raises(KdcliError, match=r"0 model tensors missing .* 1 unexpected file tensors \(extra_block"):
        load_into(timm.create_model("test_resnet", num_classes=0), tmp_path / "extra.pth", "test_resnet")


@pytest.mark.slow
def test_teach_takes_a_cached_name_and_refuses_a_partial_file(hub_cache, multieye_shards, tmp_path):
    from test_prepare_multieye import assert_one_line_error

    from kdcli.engine.checkpoint import load_checkpoint

    cache_weights(hub_cache, imagenet_state())
    common = ["teach", "--data", str(multieye_shards), "--modality", "fundus", "--model", "test_resnet", "--head",
              "linear", "--epochs", "1", "--batch-size", "16", "--workers", "0"]
    result = kdcli_run(*common, "--pretrained", NAME, "--out", str(tmp_path / "a.pt"))
    assert f"--pretrained {NAME} (" in result.stderr and "unused from the file: fc.bias, fc.weight" in result.stderr
    assert load_checkpoint(tmp_path / "a.pt").meta["config"]["pretrained"] == NAME
    torch.save({k: v for k, v in imagenet_state().items() if not k.startswith("layer4.")}, tmp_path / "p.pth")
    refused = kdcli_run(*common, "--pretrained", str(tmp_path / "p.pth"), "--out",
                        str(tmp_path / "b.pt"), ok=False)
    assert_one_line_error(refused, "p.pth", "partial load", "--allow-partial")
    kdcli_run(*common, "--pretrained", str(tmp_path / "p.pth"), "--allow-partial", "--out",
              str(tmp_path / "b.pt"))
