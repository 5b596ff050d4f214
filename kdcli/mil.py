"""`teach` and `distill` on whole-slide datasets: attention-MIL over each slide's patches, with or without the
clinical record, through the same engine as every other task; selected by the dev slides' AUC.

`--modality wsi` trains the WSI-only model; `--modality wsi,clinical` the WSI + clinical fusion model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.engine.checkpoint import file_sha256, load_checkpoint
from kdcli.engine.device import seed_everything
from kdcli.engine.loop import EngineConfig, FitResult, Validate, fit, to_device
from kdcli.errors import KdcliError, UsageError
from kdcli.locks import output_lock
from kdcli.methods import METHODS
from kdcli.methods.base import parse_params
from kdcli.models.loading import load_model
from kdcli.models.mil import MILClassifier, mil_spec
from kdcli.shards.reader import ShardStore
from kdcli.train_config import TrainConfig, check_out, checkpoint_meta, teacher_record, unlabeled_choice

BAG_SIZE = 16  # patches drawn per slide and epoch in training; evaluation scores bags of the same size
EMBEDDINGS = "embeddings"  # folder inside the shard directory


def embeddings_path(store: ShardStore, spec: dict) -> Path | None:
    """The embeddings file a model reads (recorded in its spec), checked against the data it describes."""
    info = spec.get("embeddings")
    if not info:
        return None
    path = store.root / EMBEDDINGS / f"{info['name']}.h5"
    import h5py

    if not path.is_file():
        raise KdcliError(f"the model reads patch embeddings {info['name']!r}, which this dataset lacks", path=path,
                         hint=f"run `kdcli embed --data {store.root} --model {info['model']}` (same --pretrained)")
    with h5py.File(path, "r") as handle:
        if handle.attrs["data_hash"] != store.meta.content_hash:
            raise KdcliError("embeddings were computed for other shard contents", path=path,
                             hint="delete the file and rerun `kdcli embed`")
    return path


@torch.no_grad()
def embed_patches(data: Path, model_name: str, pretrained: str | None = None, batch_size: int = 256,
                  device_name: str = "auto") -> dict[str, Any]:
    """Run a frozen timm encoder once over every patch and store the features beside the shards, so MIL training
    reads F numbers per patch instead of decoding and encoding pixels every epoch (`teach --embeddings NAME`)."""
    import hashlib

    from kdcli.models.pretrained import resolve_weights

    store = ShardStore(data)
    store.require_modality("wsi")
    # a timm name resolves to its cached file first: the features are named by the weights' bytes
    weights = file_sha256(resolve_weights(pretrained)[0]) if pretrained else "random-init-seed0"
    key = hashlib.sha256(f"{model_name}|{weights}|{store.meta.content_hash}".encode()).hexdigest()[:10]
    name = f"{model_name}-{key}"
    path = store.root / EMBEDDINGS / f"{name}.h5"
    if path.is_file():
        return {"name": name, "path": str(path), "reused": True}
    with output_lock(path, f"kdcli embed --data {data} --model {model_name}"):
        if path.is_file():  # a run that held the lock finished it between our check and our lock
            return {"name": name, "path": str(path), "reused": True}
        return _embed(store, path, name, model_name, pretrained, weights, batch_size, device_name)


@torch.no_grad()
def _embed(store: ShardStore, path: Path, name: str, model_name: str, pretrained: str | None, weights: str,
           batch_size: int, device_name: str) -> dict[str, Any]:
    import h5py
    import timm

    from kdcli.engine.device import select_device
    from kdcli.models.classifier import default_normalisation
    from kdcli.models.pretrained import load_into
    from kdcli.shards.format import atomic_write_bytes
    from kdcli.storage import new_h5

    seed_everything(0)  # random-init encoders are reproducible, and named by that
    encoder = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=3)
    if pretrained:
        load_into(encoder, pretrained, model_name)
    device = select_device(device_name)
    encoder.to(device).eval()
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in default_normalisation(3))
    rows = store.rows(None, "wsi")
    chunks = []
    for (shard,), frame in rows.group_by(["shard"], maintain_order=True):
        order = frame["index"].to_numpy()
        for start in range(0, len(order), batch_size):
            pixels = torch.from_numpy(store.read_many(shard, order[start:start + batch_size], "wsi")).to(device)
            images = (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            chunks.append(encoder(images).float().cpu().numpy().astype(np.float16))
    ids = [i for (_,), frame in rows.group_by(["shard"], maintain_order=True) for i in frame["id"].to_list()]
    features = np.concatenate(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with new_h5(tmp, path) as handle:
        handle.create_dataset("features", data=features, chunks=(min(256, len(features)), features.shape[1]))
        handle.create_dataset("id", data=ids, dtype=h5py.string_dtype())
        handle.attrs.update({"model": model_name, "pretrained": weights, "data_hash": store.meta.content_hash,
                             "dim": int(features.shape[1])})
    tmp.replace(path)
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(
        {"name": name, "model": model_name, "pretrained": weights, "dim": int(features.shape[1]),
         "patches": len(ids)}, indent=2) + "\n").encode())
    return {"name": name, "path": str(path), "reused": False, "dim": int(features.shape[1]), "patches": len(ids)}


def branches_for(modality: str, store: ShardStore) -> list[str]:
    names = {m.strip() for m in modality.split(",") if m.strip()} or {"wsi"}
    if names == {"wsi"}:
        return ["sm"]
    if names == {"wsi", "clinical"}:
        if "clinical" not in store.meta.targets:
            raise KdcliError("dataset has no clinical records", path=store.root,
                             hint="prepare it with --clinical SHEET")
        return ["mm"]
    raise UsageError(f"--modality {modality}: slide datasets take wsi or wsi,clinical")


@torch.no_grad()
def predict_bags(model: torch.nn.Module, view, device: torch.device, dtype: torch.dtype | None = None,
                 keep_attention: bool = False, bag_size: int | None = None) -> dict[str, Any]:
    """Slide probabilities (routed logits) and labels, and the attention used.

    bag_size k (what training and `kdcli evaluate` use: the training bag size): the slide's patches cut into
    disjoint bags of at most k (`eval_bags`, the same for every model and run), the slide's probability the mean
    of its bags' (BALNMP's "WSI score = mean over bags"); attention is then each patch's weight in its own bag.
    bag_size None or 0: every patch of the slide in one attention pooling (the protocol before issue 13)."""
    from kdcli.data.bags import collate_bags, eval_bags

    model.eval()
    out: dict[str, list] = {"probs": [], "labels": [], "attention": []}
    for i in range(len(view)):
        item = view[i]
        if bag_size:
            bags = eval_bags(len(item["bag_mask"]), bag_size, view.records[i])
            batch = collate_bags([bag_item(item, chosen) for chosen in bags])
        else:
            batch = collate_bags([item])
        batch = to_device(batch, device, False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            result = model(batch)
        out["probs"].append(result["logits"].float().softmax(-1).mean(0).cpu().numpy())
        out["labels"].append(int(batch["label"][0]))
        if keep_attention:
            key = "attention_sm" if "attention_sm" in result and not bool(batch["clinical_present"][0]) \
                else next(k for k in ("attention_mm", "attention_sm") if k in result)
            attention = result[key].float().cpu().numpy()
            if bag_size:  # back to the slide's patch order
                weights = np.zeros(len(item["bag_mask"]), np.float32)
                for row, chosen in enumerate(bags):
                    weights[chosen] = attention[row, :len(chosen)]
                attention = weights[None]
            out["attention"].append(attention[0])
    return {"probs": np.stack(out["probs"]), "labels": np.array(out["labels"]), "attention": out["attention"]}


def bag_item(item: dict, chosen: np.ndarray) -> dict:
    """The item restricted to the patches `chosen` (per-patch tensors indexed, the slide's fields kept)."""
    index = torch.from_numpy(chosen)
    return {k: (v[index] if k in ("patches", "features", "bag_mask") else v) for k, v in item.items()}


def slide_validator(dev_view, classes: list[str], cfg: EngineConfig) -> Validate:
    from kdcli.metrics.classification import classification_metrics

    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        predicted = predict_bags(model, dev_view, device, dtype, bag_size=BAG_SIZE)
        metrics = classification_metrics(predicted["labels"], predicted["probs"], classes)
        if dev_view.has_clinical:  # every dev record withheld: how the model does without clinical data
            dev_view.hide_clinical = set(dev_view.records)
            try:
                without = predict_bags(model, dev_view, device, dtype, bag_size=BAG_SIZE)
            finally:
                dev_view.hide_clinical = set()
            metrics["auc_without_clinical"] = classification_metrics(without["labels"], without["probs"],
                                                                     classes)["auc"]
            # what a model meant for missing records is selected by: both routes weigh the same
            values = [v for v in (metrics["auc"], metrics["auc_without_clinical"]) if v is not None]
            metrics["auc_both"] = sum(values) / len(values) if values else None
        return metrics

    validate.samples = len(dev_view)  # slides, for the start-up line
    return validate


def _meta(cfg: TrainConfig, store: ShardStore, model: MILClassifier, kind: str, params: Any,
          teacher: dict | None) -> dict[str, Any]:
    return checkpoint_meta(cfg, store, model.spec, kind, params, teacher, classes=store.meta.classes,
                           label_task=None, tasks=None, size=store.meta.modalities["wsi"]["shape"][0],
                           bag_size=BAG_SIZE)


def dev_validator(cfg: TrainConfig, store: ShardStore, dev_view) -> Validate:
    """Slide-level dev metrics (the task's validator, tasks/mil.py)."""
    return slide_validator(dev_view, store.meta.classes, cfg.engine)


def _views(cfg: TrainConfig, store: ShardStore, spec: dict, unlabeled: bool = False):
    from kdcli.data.bags import BagView

    embeddings = embeddings_path(store, spec)
    train = BagView(store, "train", BAG_SIZE, augment=cfg.augment != "none", seed=cfg.engine.seed,
                    embeddings=embeddings, unlabeled=unlabeled)
    return train, BagView(store, "dev", embeddings=embeddings)


def _embeddings_spec(cfg: TrainConfig, store: ShardStore) -> dict | None:
    if not cfg.embeddings:
        return None
    import h5py

    path = store.root / EMBEDDINGS / f"{cfg.embeddings}.h5"
    if not path.is_file():
        found = sorted(p.stem for p in (store.root / EMBEDDINGS).glob("*.h5"))
        raise KdcliError(f"no embeddings {cfg.embeddings!r}; found {', '.join(found) or 'none'}", path=path,
                         hint="run `kdcli embed --data SHARDS --model NAME` and pass the name it prints")
    with h5py.File(path, "r") as handle:
        return {"name": cfg.embeddings, "model": str(handle.attrs["model"]), "dim": int(handle.attrs["dim"])}


def teach_mil(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    branches = branches_for(cfg.modality, store)
    cfg.modality = "wsi" if branches == ["sm"] else "wsi,clinical"
    method_cls = METHODS.get(cfg.method)  # the task's supervised method (tasks/mil.py)
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    seed_everything(cfg.engine.seed)
    dims = store.meta.targets["clinical"]["shape"][0] if "clinical" in store.meta.targets else 0
    spec = mil_spec(cfg.model or "resnet18", len(store.meta.classes), branches, dims)
    embeddings = _embeddings_spec(cfg, store)
    if embeddings:
        spec.update(embeddings=embeddings, backbone=embeddings["model"])
    model = MILClassifier(spec)
    train, dev = _views(cfg, store, spec)
    meta = _meta(cfg, store, model, "teacher", params, None)
    return fit(method_cls(params, model), train, dev_validator(cfg, store, dev), cfg.engine,
               out, meta, resume=cfg.resume, log=log, train_labels=train.labels)


def _unlabeled_slides(cfg: TrainConfig, store: ShardStore, method_cls, log: Callable[[str], None]) -> bool:
    """unlabeled_choice for slides: dataset.json counts patches, the log counts slides."""
    import polars as pl

    count = store.rows("train", "wsi").filter(~pl.col("labelled"))["record"].n_unique()
    return unlabeled_choice(cfg, store, method_cls, log, what="slides", count=count)


def distill_mil(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    method_cls = METHODS.get(cfg.method)
    if len(cfg.teacher) != 1:
        raise UsageError(f"--method {cfg.method} takes exactly one --teacher checkpoint")
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    checkpoint = load_checkpoint(Path(cfg.teacher[0]))
    if checkpoint.meta.get("task") != store.meta.task or checkpoint.meta["classes"] != store.meta.classes:
        raise KdcliError("not a slide (MIL) checkpoint for this dataset's classes", path=checkpoint.path,
                         hint="use the checkpoint of `teach --modality wsi,clinical` on this dataset")
    teacher = load_model(checkpoint)
    read = (teacher.spec.get("embeddings") or {}).get("name", "")
    if cfg.embeddings and cfg.embeddings != read:
        raise UsageError(f"--embeddings {cfg.embeddings}: the student reads what its teacher read "
                         f"({f'embeddings {read!r}' if read else 'patch pixels'}); drop --embeddings")
    seed_everything(cfg.engine.seed)
    student = method_cls.make_student(params, teacher)
    cfg.modality = "wsi"  # the student answers from the slide alone when the record is missing
    train, dev = _views(cfg, store, student.spec, _unlabeled_slides(cfg, store, method_cls, log))
    teacher_info = teacher_record(cfg.teacher[0], checkpoint)
    meta = _meta(cfg, store, student, "student", params, teacher_info)
    if cfg.engine.metric == "auc":  # the task's: a model for missing records is selected on both routes
        cfg.engine.metric = "auc_both"
    return fit(method_cls(params, student, None), train, dev_validator(cfg, store, dev),
               cfg.engine, out, meta, resume=cfg.resume, log=log, train_labels=train.labels)
