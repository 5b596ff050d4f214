"""`kdcli export`: ONNX (run with onnxruntime) and TorchScript files give PyTorch's outputs on fresh inputs (another
batch size, another number of patches), for image classifiers (single-label, multi-label, multi-head), the
segmentation U-Net and slide MIL models; the contract beside the file says what goes in and comes out.

Checkpoints are written by hand (untrained tiny models, the meta training writes); the slow test exports a
trained CoDA student and checks it against `kdcli predict` on raw files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.models.classifier import Classifier, default_normalisation

SIZE = 32


def record(source: str, modalities: dict[str, int], **extra) -> dict:
    return {"source": source, "size": SIZE, "options": {},
            "modalities": {m: {"shape": [SIZE, SIZE, c], "dtype": "uint8"} for m, c in modalities.items()}, **extra}


def save(path: Path, network: torch.nn.Module, **meta) -> Path:
    base = {"kind": "teacher", "method": "supervised", "data": {"path": "", "source": meta["preprocess"]["source"]}}
    save_checkpoint(path, {**base, **meta}, network.state_dict())
    return path


def image_spec(channels: int, classes: int, head: str = "linear", **extra) -> dict:
    mean, std = default_normalisation(channels)
    return {"backbone": "test_resnet", "head": head, "in_chans": channels, "num_classes": classes, "mean": mean,
            "std": std, **extra}


def classifier(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    spec = image_spec(3, 9)
    return save(tmp_path / "fundus.pt", Classifier(spec).eval(), task="classification", model=spec,
                classes=[f"c{i}" for i in range(9)], modality="fundus", preprocess=record("multieye", {"fundus": 3}))


def multilabel(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    spec = image_spec(1, 5)
    return save(tmp_path / "xray.pt", Classifier(spec).eval(), task="multilabel", model=spec,
                classes=list("ABCDE"), modality="xray", preprocess=record("cxr", {"xray": 1}))


def multihead(tmp_path: Path) -> Path:
    torch.manual_seed(2)
    spec = image_spec(3, 0, head="multi", tasks={"dr": 5, "amd": 4})
    return save(tmp_path / "sall.pt", Classifier(spec).eval(), task="classification", model=spec, classes=[],
                tasks={"dr": list("01234"), "amd": list("0123")}, modality="fundus",
                preprocess=record("fundus-grading", {"fundus": 3}))


def unet(tmp_path: Path) -> Path:
    from kdcli.models.unet import UNet

    torch.manual_seed(3)
    spec = {"arch": "unet", "name": "plain-4-2", "in_chans": 2, "modalities": ["t1ce", "flair"], "num_classes": 4,
            "backbone": "plain", "base": 4, "depth": 2}
    model = UNet(spec).eval()
    for module in model.modules():  # BatchNorm running statistics off their defaults, so eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return save(tmp_path / "seg.pt", model, task="segmentation", model=spec, classes=["bg", "ncr", "ed", "et"],
                modality="t1ce,flair", regions={"wt": [1, 2, 3], "tc": [1, 3], "et": [3]},
                preprocess=record("brats", {"t1ce": 1, "flair": 1}))


def mil(tmp_path: Path, branches: list[str]) -> Path:
    from kdcli.models.mil import MILClassifier, mil_spec

    torch.manual_seed(4)
    spec = mil_spec("test_resnet", 2, branches, clinical_dims=6, hidden=16, clinical_hidden=8)
    return save(tmp_path / f"mil-{'-'.join(branches)}.pt", MILClassifier(spec).eval(), task="mil", model=spec,
                classes=["N0", "N+"], modality="wsi" if branches == ["sm"] else "wsi,clinical", bag_size=16,
                preprocess=record("camelyon", {"wsi": 3}))


MAKERS = {"classifier": classifier, "multilabel": multilabel, "multihead": multihead, "unet": unet,
          "mil-wsi": lambda p: mil(p, ["sm"]), "mil-bidirectional": lambda p: mil(p, ["mm", "sm"])}


def fresh_inputs(contract: dict) -> dict[str, np.ndarray]:
    """Random inputs of the contract's names, dtypes and shapes, batch 3 and 7 patches (the examples were 1-2, 5)."""
    rng = np.random.default_rng(7)
    inputs = {}
    for spec in contract["inputs"]:
        shape = [3 if d == "batch" else 7 if d == "patches" else d for d in spec["shape"]]
        if spec["dtype"] == "uint8":
            inputs[spec["name"]] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif spec["dtype"] == "bool":
            inputs[spec["name"]] = rng.random(shape) < 0.7 if spec["name"] != "bag_mask" else np.ones(shape, bool)
        else:
            inputs[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    if "bag_mask" in inputs:
        inputs["bag_mask"][0, 5:] = False  # a padded bag: masked patches must not count
    return inputs


def pytorch_outputs(checkpoint: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The checkpoint's own model on the inputs, as kdcli runs it (not through the export wrappers)."""
    from kdcli.train import load_model

    meta = load_checkpoint(checkpoint).meta
    model = load_model(load_checkpoint(checkpoint)).eval()
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        if meta["task"] == "mil":
            out = model({**tensors, **({} if "clinical_present" in tensors else
                                       {"clinical_present": torch.zeros(3, dtype=torch.bool)})})
            logits = out["logits"]
            return [logits.numpy(), logits.softmax(-1).numpy(),
                    *(out[f"attention_{b}"].numpy() for b in meta["model"]["branches"])]
        out = model(tensors["image"])
        if meta.get("tasks"):
            return [a for t in meta["tasks"] for a in (out["task_logits"][t].numpy(),
                                                        out["task_logits"][t].softmax(1).numpy())]
        logits = out["logits"]
        activation = logits.sigmoid() if meta["task"] == "multilabel" else logits.softmax(1)
        return [logits.numpy(), activation.numpy()]


@pytest.mark.slow  # tracing a model takes 2-4 s on a shared 2-core machine; the U-Net case runs in the fast path
@pytest.mark.parametrize("kind", list(MAKERS))
def test_torchscript_matches_pytorch(tmp_path, kind) -> None:
    checkpoint = MAKERS[kind](tmp_path)
    out = tmp_path / "model.pt"
    kdcli_run("export", checkpoint, "--format", "torchscript", "--out", out)
    contract = json.loads((tmp_path / "model.pt.json").read_text())
    inputs = fresh_inputs(contract)
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        got = loaded(*(torch.from_numpy(v) for v in inputs.values()))
    for expected, value in zip(pytorch_outputs(checkpoint, inputs), got, strict=True):
        assert np.allclose(expected, value.numpy(), atol=1e-5), kind
    assert max(contract["verified"]["max_abs_diff"].values()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MAKERS))
def test_onnx_matches_pytorch_in_onnxruntime(tmp_path, kind) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    checkpoint = MAKERS[kind](tmp_path)
    out = tmp_path / "model.onnx"
    kdcli_run("export", checkpoint, "--format", "onnx", "--out", out)
    contract = json.loads((tmp_path / "model.onnx.json").read_text())
    inputs = fresh_inputs(contract)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in contract["inputs"]]
    got = session.run(contract["outputs"], inputs)
    for expected, value in zip(pytorch_outputs(checkpoint, inputs), got, strict=True):
        assert np.allclose(expected, value, atol=1e-4), kind
    assert max(contract["verified"]["max_abs_diff"].values()) < 1e-4  # the check export itself ran


# slow: traces and runs a U-Net in both formats; both formats stay fast on the classifier
@pytest.mark.slow
def test_unet_exports_match_pytorch(tmp_path) -> None:
    """The fast path: the smallest model, both formats (ONNX where onnxruntime is installed)."""
    checkpoint = unet(tmp_path)
    kdcli_run("export", checkpoint, "--format", "torchscript", "--out", tmp_path / "seg.ts")
    inputs = fresh_inputs(json.loads((tmp_path / "seg.ts.json").read_text()))
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "seg.ts"))(torch.from_numpy(inputs["image"]))
    expected = pytorch_outputs_segmentation(checkpoint, inputs["image"])
    assert np.allclose(expected, got[0].numpy(), atol=1e-5)
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return
    kdcli_run("export", checkpoint, "--format", "onnx", "--out", tmp_path / "seg.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(expected, session.run(["logits"], {"image": inputs["image"]})[0], atol=1e-4)


def pytorch_outputs_segmentation(checkpoint: Path, image: np.ndarray) -> np.ndarray:
    from kdcli.train import load_model

    with torch.no_grad():
        return load_model(load_checkpoint(checkpoint))(torch.from_numpy(image))["logits"].numpy()


@pytest.mark.slow
def test_the_contract_says_what_goes_in_and_comes_out(tmp_path) -> None:
    kdcli_run("export", classifier(tmp_path), "--format", "torchscript", "--out", tmp_path / "fundus.ts")
    contract = json.loads((tmp_path / "fundus.ts.json").read_text())
    assert contract["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["batch", 3, SIZE, SIZE]}]
    assert contract["outputs"] == ["logits", "probabilities"] and contract["activation"] == "softmax"
    assert contract["input_size"] == SIZE and contract["channels"] == "RGB" and contract["modality"] == "fundus"
    assert contract["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert contract["classes"] == [f"c{i}" for i in range(9)] and contract["preprocess"]["source"] == "multieye"
    assert any("zero-pad" in step for step in contract["preprocessing"])
    kdcli_run("export", unet(tmp_path), "-f", "torchscript", "-o", tmp_path / "seg.ts")
    seg = json.loads((tmp_path / "seg.ts.json").read_text())
    assert seg["channels"] == ["t1ce", "flair"] and seg["inputs"][0]["dtype"] == "float32"
    assert any("z-score" in step for step in seg["preprocessing"])


def test_bad_requests_are_one_line(tmp_path) -> None:
    checkpoint = classifier(tmp_path)
    result = kdcli_run("export", checkpoint, "--format", "onnx", "--out", tmp_path / "model.pt", ok=False)
    assert result.exit_code == 2 and ".onnx" in result.output, result.output
    (tmp_path / "taken.ts").write_text("keep me")
    result = kdcli_run("export", checkpoint, "--format", "torchscript", "--out", tmp_path / "taken.ts", ok=False)
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    assert (tmp_path / "taken.ts").read_text() == "keep me"
    result = kdcli_run("export", checkpoint, "--format", "tflite", "--out", tmp_path / "m.tflite", ok=False)
    assert result.exit_code == 2, result.output


def test_slide_models_on_cached_embeddings_export_their_features_input(tmp_path) -> None:
    from kdcli.models.mil import MILClassifier, mil_spec

    spec = {**mil_spec("test_resnet", 2, ["sm"], clinical_dims=1, hidden=16), "embeddings": {"name": "e", "dim": 12}}
    checkpoint = save(tmp_path / "emb.pt", MILClassifier(spec).eval(), task="mil", model=spec, classes=["N0", "N+"],
                      modality="wsi", bag_size=16, preprocess=record("camelyon", {"wsi": 3}))
    kdcli_run("export", checkpoint, "--format", "torchscript", "--out", tmp_path / "emb.ts")
    contract = json.loads((tmp_path / "emb.ts.json").read_text())
    assert [i["name"] for i in contract["inputs"]] == ["features", "bag_mask"]
    assert contract["inputs"][0]["shape"] == ["batch", "patches", 12]


@pytest.mark.slow
def test_exported_student_on_prepared_pixels_equals_predict_on_raw_files(fundus_student, multieye_raw, tmp_path):
    """A trained CoDA student (concept head): the exported file, fed the contract's preprocessing of raw photos,
    gives the probabilities `kdcli predict` gives on those photos."""
    import polars as pl

    from kdcli.predict.images import image_reader

    kdcli_run("export", fundus_student, "--format", "torchscript", "--out", tmp_path / "student.ts")
    contract = json.loads((tmp_path / "student.ts.json").read_text())
    photos = sorted((multieye_raw / "assemble" / "train" / "ImageData").rglob("*.png"))[:6]
    kdcli_run("predict", fundus_student, *photos, "--out", tmp_path / "p.csv", "--device", "cpu")
    reader = image_reader(contract["preprocess"], contract["modality"])
    images = np.stack([reader(str(p)).transpose(2, 0, 1) for p in photos])
    with torch.no_grad():
        _, probs = torch.jit.load(str(tmp_path / "student.ts"))(torch.from_numpy(images))
    table = pl.read_csv(tmp_path / "p.csv")
    expected = table.select([f"prob_{c}" for c in contract["classes"]]).to_numpy()
    assert np.allclose(probs.numpy(), expected, atol=1e-5)
