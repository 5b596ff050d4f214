"""`kdcli export CHECKPOINT --format onnx|torchscript --out FILE`: the model as a file other runtimes load, and
beside it (`<out>.json`, e.g. model.onnx.json) the preprocessing contract: what goes in (shape, dtype, channels, the
preprocessing `prepare` applied), what comes out (names, activation, classes).

What is exported takes what `kdcli predict` feeds the PyTorch model and returns plain tensors:
    image classifiers  image uint8 (N, C, H, W), the stored pixels; /255 and mean/std are inside the model
                       -> logits, probabilities (softmax; sigmoid for multi-label; one pair per head for
                       multi-head students: logits_<task>, probabilities_<task>)
    segmentation       image float32 (N, C, H, W), the z-scored, cropped, resized slices, channels in the
                       checkpoint's sequence order -> logits, probabilities (N, classes, H, W)
    slides (MIL)       patches uint8 (B, K, 3, H, W) and bag_mask bool (B, K) (K may vary; padding masked out),
                       plus clinical float32 (B, D), clinical_mask float32 (B, D), clinical_present bool (B,) for
                       models with a fusion branch -> logits, probabilities, attention (B, K) per branch
                       (models on cached patch embeddings take features float32 (B, K, F) instead of patches)
A slide's score over several bags (the mean of its bags', as `kdcli evaluate`) is left to the caller.

ONNX uses torch's TorchScript-based exporter (the dynamo one needs onnxscript, not a kdcli dependency) and needs
the `onnx` package (`pip install 'kdcli[export]'`); the written file is checked with onnx.checker."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli import __version__
from kdcli.engine.checkpoint import Checkpoint, file_sha256, load_checkpoint
from kdcli.errors import KdcliError, UsageError
from kdcli.tasks import task_of

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript", ".pth")}
OPSET = 17


@dataclass
class ExportOptions:
    checkpoint: Path
    format: str
    out: Path
    overwrite: bool = False
    data: Path | None = None  # checkpoints older than the preprocessing record: the shards they were trained on


class ImageExport(nn.Module):
    """uint8 images -> logits and probabilities of each head."""

    def __init__(self, model: nn.Module, heads: list[str | None], multilabel: bool):
        super().__init__()
        self.model, self.heads, self.multilabel = model, heads, multilabel

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        results = []
        for head in self.heads:
            logits = (out["task_logits"][head] if head else out["logits"]).float()
            results += [logits, logits.sigmoid() if self.multilabel else logits.softmax(1)]
        return tuple(results)


class SegmentationExport(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)["logits"].float()
        return logits, logits.softmax(1)


class SlideExport(nn.Module):
    """Named bag tensors -> logits, probabilities and each branch's attention."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.branches = list(model.spec["branches"])

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = dict(zip(self.names, tensors, strict=True))
        if "clinical_present" not in batch:
            batch["clinical_present"] = torch.zeros(tensors[0].shape[0], dtype=torch.bool)
        out = self.model(batch)
        logits = out["logits"].float()
        return (logits, logits.softmax(-1), *(out[f"attention_{b}"].float() for b in self.branches))


def check_options(options: ExportOptions) -> Path:
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r}: use onnx or torchscript")
    out = Path(options.out)
    if not out.name.lower().endswith(FORMATS[options.format]):
        raise UsageError(f"--out {out}: a {options.format} file ends in {' or '.join(FORMATS[options.format])}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out}/model{FORMATS[options.format][0]}")
    if out.exists() and not options.overwrite:
        raise KdcliError("exists", path=out, hint="pass --overwrite to replace it")
    if Path(options.checkpoint).exists() and out.exists() and out.resolve() == Path(options.checkpoint).resolve():
        raise UsageError(f"--out {out} is the checkpoint itself; choose another name")
    if options.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("--format onnx needs the onnx package: pip install 'kdcli[export]' (or onnx)") from None
    return out


def example_inputs(checkpoint: Checkpoint, record: dict[str, Any]) -> tuple[nn.Module, dict[str, torch.Tensor],
                                                                            list[str], dict[str, dict[int, str]]]:
    """(wrapper, example inputs by name, output names, dynamic axes) for the checkpoint's kind of model."""
    return task_of(checkpoint.meta).run("export_inputs", checkpoint, record)


def segmentation_inputs(checkpoint: Checkpoint, record: dict[str, Any]):
    from kdcli.models.loading import load_model

    model = load_model(checkpoint).eval()
    size = int(record["size"])
    channels = len(checkpoint.meta["model"]["modalities"])
    inputs = {"image": torch.randn(2, channels, size, size)}
    return (SegmentationExport(model), inputs, ["logits", "probabilities"],
            {"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}})


def slide_inputs(checkpoint: Checkpoint, record: dict[str, Any]):
    from kdcli.models.loading import load_model

    model = load_model(checkpoint).eval()
    size = int(record["size"])
    spec = checkpoint.meta["model"]
    count = 5
    if spec.get("embeddings"):
        inputs = {"features": torch.randn(1, count, int(spec["embeddings"]["dim"]))}
    else:
        inputs = {"patches": torch.randint(0, 256, (1, count, 3, size, size), dtype=torch.uint8)}
    inputs["bag_mask"] = torch.ones(1, count, dtype=torch.bool)
    if "mm" in spec["branches"]:
        dims = int(spec["clinical_dims"])
        inputs.update(clinical=torch.randn(1, dims), clinical_mask=torch.ones(1, dims))
        if "sm" in spec["branches"]:
            inputs["clinical_present"] = torch.ones(1, dtype=torch.bool)
    outputs = ["logits", "probabilities", *(f"attention_{b}" for b in spec["branches"])]
    dynamic = {name: {0: "batch", 1: "patches"} for name in ("patches", "features", "bag_mask") if name in inputs}
    dynamic.update({name: {0: "batch"} for name in inputs if name not in dynamic})
    dynamic.update({name: {0: "batch", 1: "patches"} if name.startswith("attention") else {0: "batch"}
                    for name in outputs})
    return SlideExport(model, list(inputs)), inputs, outputs, dynamic


def image_inputs(checkpoint: Checkpoint, record: dict[str, Any]):
    from kdcli.models.loading import load_model
    meta = checkpoint.meta
    model = load_model(checkpoint).eval()
    size = int(record["size"])
    channels = int(record["modalities"][meta["modality"]]["shape"][2])
    heads = list(meta["tasks"]) if meta.get("tasks") else [None]
    outputs = [name for head in heads for name in ((f"logits_{head}", f"probabilities_{head}") if head else
                                                    ("logits", "probabilities"))]
    inputs = {"image": torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)}
    dynamic = {name: {0: "batch"} for name in ("image", *outputs)}
    return ImageExport(model, heads, task_of(meta).activation == "sigmoid"), inputs, outputs, dynamic


def export(options: ExportOptions) -> dict[str, Any]:
    """Write the model and its contract; returns the contract."""
    from kdcli.predict.contract import checkpoint_preprocessing

    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    record = checkpoint_preprocessing(checkpoint.meta, checkpoint.path, options.data)
    wrapper, inputs, outputs, dynamic = example_inputs(checkpoint, record)
    wrapper.eval()  # the ONNX exporter restores the wrapper's mode afterwards, recursively: it must be eval too
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's notes are not the user's
            if options.format == "onnx":
                torch.onnx.export(wrapper, tuple(inputs.values()), str(tmp), dynamo=False, input_names=list(inputs),
                                  output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET)
                import onnx

                onnx.checker.check_model(str(tmp))
            else:
                traced = torch.jit.trace(wrapper, tuple(inputs.values()), strict=False)
                traced.save(str(tmp))
        tmp.replace(out)
    except KdcliError:
        raise
    except Exception as exc:  # noqa: BLE001  (exporters raise many types: one line, nothing left behind)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise KdcliError(f"cannot export this {checkpoint.meta.get('task')} model as {options.format} "
                         f"({type(exc).__name__}: {reason})", path=checkpoint.path,
                         hint="try the other --format") from None
    finally:
        tmp.unlink(missing_ok=True)
    contract = build_contract(checkpoint, record, options.format, out, inputs, outputs)
    contract["verified"] = verify(wrapper, out, options.format, inputs, outputs)
    from kdcli.shards.format import atomic_write_bytes

    atomic_write_bytes(contract_path(out), (json.dumps(contract, indent=2) + "\n").encode())
    return contract


def verify(wrapper: nn.Module, out: Path, fmt: str, inputs: dict[str, torch.Tensor],
           outputs: list[str]) -> dict[str, Any] | None:
    """The written file run on the example inputs against PyTorch: the largest absolute difference per output
    (ONNX: only where onnxruntime is installed; None otherwise)."""
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper.eval()(*inputs.values())]
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(outputs, {name: tensor.numpy() for name, tensor in inputs.items()})
        runtime = f"onnxruntime {onnxruntime.__version__}"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(out))
        with torch.no_grad():
            got = [t.numpy() for t in loaded(*inputs.values())]
        runtime = f"torch.jit {torch.__version__}"
    import numpy as np

    return {"runtime": runtime, "inputs": "random, the shapes above",
            "max_abs_diff": {name: float(np.abs(e - g).max()) for name, e, g in zip(outputs, expected, got,
                                                                                     strict=True)}}


def contract_path(out: Path) -> Path:
    """model.onnx -> model.onnx.json beside it (one contract per exported file, whatever the format)."""
    return out.with_name(out.name + ".json")


def build_contract(checkpoint: Checkpoint, record: dict[str, Any], fmt: str, out: Path,
                   inputs: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, Any]:
    meta = checkpoint.meta
    size = int(record["size"])
    shapes = {name: ["batch", *(("patches",) if name in ("patches", "features", "bag_mask") else ()),
                     *list(tensor.shape[2 if name in ("patches", "features", "bag_mask") else 1:])]
              for name, tensor in inputs.items()}
    contract: dict[str, Any] = {
        "format": fmt, "file": out.name, "sha256": file_sha256(out), "kdcli_version": __version__,
        "checkpoint": str(checkpoint.path), "checkpoint_sha256": file_sha256(checkpoint.path),
        "task": task_of(meta).name, "kind": meta.get("kind"), "method": meta.get("method"),
        "modality": meta.get("modality"),
        "inputs": [{"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": shapes[name]}
                   for name, tensor in inputs.items()],
        "outputs": outputs, "input_size": size,
        "preprocessing": preprocessing_steps(meta, record),
        "preprocess": record,
    }
    if meta.get("tasks"):
        contract["tasks"] = meta["tasks"]
    else:
        contract["classes"] = meta["classes"]
    contract.update(task_of(meta).run("export_contract", checkpoint, record))
    return contract


def segmentation_contract(checkpoint: Checkpoint, record: dict[str, Any]) -> dict[str, Any]:
    return {"channels": list(checkpoint.meta["model"]["modalities"]), "regions": checkpoint.meta.get("regions"),
            "activation": "softmax over classes (axis 1); argmax = kdcli label index"}


def slide_contract(checkpoint: Checkpoint, record: dict[str, Any]) -> dict[str, Any]:
    mean, std = model_mean_std(checkpoint)
    return {"channels": "RGB", "normalisation": {"inside_model": True, "scale": 1 / 255, "mean": mean, "std": std},
            "branches": checkpoint.meta["model"]["branches"], "bag_size": checkpoint.meta.get("bag_size"),
            "activation": "softmax; a slide's score in kdcli is the mean over disjoint bags of bag_size"}


def image_contract(checkpoint: Checkpoint, record: dict[str, Any]) -> dict[str, Any]:
    channels = int(record["modalities"][checkpoint.meta["modality"]]["shape"][2])
    mean, std = model_mean_std(checkpoint)
    return {"channels": "RGB" if channels == 3 else "grey" if channels == 1 else channels,
            "normalisation": {"inside_model": True, "scale": 1 / 255, "mean": mean, "std": std},
            "activation": "sigmoid per finding" if task_of(checkpoint.meta).activation == "sigmoid" else "softmax"}


def model_mean_std(checkpoint: Checkpoint) -> tuple[list[float], list[float]]:
    spec = checkpoint.meta["model"]
    if "mean" in spec:
        return list(spec["mean"]), list(spec["std"])
    base = spec.get("classifier") or {}  # CVI: the classifier it wraps
    if "mean" in base:
        return list(base["mean"]), list(base["std"])
    from kdcli.models.classifier import default_normalisation

    return default_normalisation(int(spec.get("in_chans", 3)))


def preprocessing_steps(meta: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What `prepare` (and `kdcli predict`) does to a raw input, in words, for whoever reimplements it (the
    source's own, Source.preprocessing_steps)."""
    from kdcli.sources import SOURCES

    return SOURCES.get(record["source"]).preprocessing_steps(record, meta) if record["source"] in SOURCES else []
