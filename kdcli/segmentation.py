"""`teach` and `distill` on segmentation datasets (BraTS slices): U-Net models over any subset of the
sequences, the same engine as classification, selected by the dev volumes' mean Dice.

`--modality t1,t1ce,t2,flair` gives the model those sequences as channels, in that order; a checkpoint records
the order, so evaluate and distill feed it the same way.

Unlabeled slices (`prepare brats --unlabeled`) never reach teach; distill hands them to methods that learn from
them (ProtoKD), drawn `--unlabeled-ratio` per labelled slice, unless `--no-unlabeled`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.engine.checkpoint import Checkpoint, load_checkpoint
from kdcli.engine.device import seed_everything
from kdcli.engine.loop import FitResult, fit
from kdcli.errors import KdcliError, UsageError
from kdcli.methods import METHODS
from kdcli.methods.base import parse_params
from kdcli.models.loading import load_weights
from kdcli.models.unet import UNet
from kdcli.shards.reader import ShardStore
from kdcli.train_config import TrainConfig, check_out, checkpoint_meta, teacher_record, unlabeled_choice

PLAIN = re.compile(r"^plain(?:-(\d+))?(?:-(\d+))?$")  # plain[-BASE[-DEPTH]]: ProtoKD's 16 filters, 4 levels


def parse_modalities(text: str, store: ShardStore) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError(f"--modality is required; the dataset has {', '.join(store.meta.modalities)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--modality {text}: a sequence is named twice")
    for name in names:
        store.require_modality(name)
    return names


def regions(store: ShardStore) -> dict[str, list[int]]:
    from kdcli.metrics.segmentation import DEFAULT_REGIONS

    return store.meta.extra.get("regions") or DEFAULT_REGIONS


def build_unet(cfg: TrainConfig, store: ShardStore, modalities: list[str], template: dict | None = None,
               log: Callable[[str], None] | None = None) -> UNet:
    name = cfg.model or (template or {}).get("name") or "plain"
    spec: dict[str, Any] = {"arch": "unet", "name": name, "in_chans": len(modalities), "modalities": modalities,
                            "num_classes": len(store.meta.classes)}
    plain = PLAIN.match(name)
    if plain:
        spec.update(backbone="plain", base=int(plain.group(1) or 16), depth=int(plain.group(2) or 4))
    else:
        spec.update(backbone=name, base=16)
    if cfg.pretrained and plain:
        raise UsageError(f"--pretrained: the plain U-Net ({name}) has no pretrained counterpart; use a timm encoder "
                         "(--model resnet18, say) with that network's weights, or drop --pretrained")
    model = UNet(spec)
    if cfg.pretrained:  # classification weights of the same timm network fill the encoder
        from kdcli.models.pretrained import load_into

        load_into(model.encoder.body, cfg.pretrained, name, cfg.allow_partial, log)
    return model


def load_unet(checkpoint: Checkpoint) -> UNet:
    return load_weights(UNet(checkpoint.meta["model"]), checkpoint)


def check_segmentation_checkpoint(checkpoint: Checkpoint, store: ShardStore) -> list[str]:
    """The checkpoint's sequences, after checking it segments this dataset's classes from sequences it has."""
    meta = checkpoint.meta
    if meta.get("task") != store.meta.task:
        raise KdcliError("not a segmentation checkpoint", path=checkpoint.path,
                         hint="use a checkpoint from `kdcli teach` on a segmentation dataset")
    if meta["classes"] != store.meta.classes:
        raise KdcliError(f"checkpoint classes {meta['classes']} differ from the dataset's {store.meta.classes}",
                         path=checkpoint.path)
    modalities = meta["model"]["modalities"]
    missing = [m for m in modalities if m not in store.meta.modalities]
    if missing:
        raise KdcliError(f"checkpoint takes {', '.join(missing)}, which the dataset lacks", path=checkpoint.path)
    return modalities


def _meta(cfg: TrainConfig, store: ShardStore, model: UNet, kind: str, params: Any, teacher: dict | None) -> dict:
    return checkpoint_meta(cfg, store, model.spec, kind, params, teacher,
                           modality=",".join(model.spec["modalities"]), classes=store.meta.classes,
                           regions=regions(store), size=store.meta.targets["seg"]["shape"][0])


def dev_validator(cfg: TrainConfig, store: ShardStore, dev):
    """Mean Dice over the dev cases' regions (the task's validator, tasks/segmentation.py)."""
    from kdcli.engine.segmentation import segmentation_validator

    return segmentation_validator(dev, regions(store), cfg.engine)


def _prepare_engine(cfg: TrainConfig) -> None:
    if cfg.cache_teacher:
        raise UsageError("--cache-teacher: ProtoKD needs the teacher on each augmented slice; it runs online")


def _views(cfg: TrainConfig, store: ShardStore, modalities: list[str], teacher_modalities: list[str] | None,
           unlabeled: bool = False):
    from kdcli.data.slices import SliceView

    train = SliceView(store, "train", modalities, teacher_modalities, augment=cfg.augment != "none",
                      seed=cfg.engine.seed, unlabeled=unlabeled)
    dev = SliceView(store, "dev", modalities)
    if len(train) == 0 or len(dev) == 0:
        raise KdcliError("no slices in train or dev", path=store.root, hint="prepare with more cases")
    return train, dev


def teach_segmentation(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    modalities = parse_modalities(cfg.modality, store)
    cfg.modality = ",".join(modalities)
    _prepare_engine(cfg)
    method_cls = METHODS.get(cfg.method)  # the task's supervised method (tasks/segmentation.py)
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    seed_everything(cfg.engine.seed)
    model = build_unet(cfg, store, modalities, log=log)
    train, dev = _views(cfg, store, modalities, None)
    meta = _meta(cfg, store, model, "teacher", params, None)
    validate = dev_validator(cfg, store, dev)
    return fit(method_cls(params, model), train, validate, cfg.engine, out, meta, resume=cfg.resume, log=log)


def distill_segmentation(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    method_cls = METHODS.get(cfg.method)
    if len(cfg.teacher) != 1:
        raise UsageError(f"--method {cfg.method} takes exactly one --teacher checkpoint")
    _prepare_engine(cfg)
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    checkpoint = load_checkpoint(Path(cfg.teacher[0]))
    teacher_modalities = check_segmentation_checkpoint(checkpoint, store)
    teacher = load_unet(checkpoint)
    if not cfg.modality:
        raise UsageError(f"--student is required: one or more of {', '.join(store.meta.modalities)}")
    modalities = parse_modalities(cfg.modality, store)
    cfg.modality = ",".join(modalities)
    seed_everything(cfg.engine.seed)  # the student starts from the very weights its teach-baseline starts from
    student = build_unet(cfg, store, modalities, template=teacher.spec, log=log)
    # the counts are per sequence, every one alike (a slice carries all four): the student's first tells
    unlabeled = unlabeled_choice(cfg, store, method_cls, log, modality=modalities[0], what="slices")
    train, dev = _views(cfg, store, modalities, teacher_modalities, unlabeled)
    # unlabeled slices as label -1, every labelled one alike (0): the sampler draws --unlabeled-ratio of the former
    # per labelled slice and the labelled ones uniformly, balanced or not; without them, no labels, as ever (a
    # uniform draw of the slices, not a balance of the tumour flag)
    train_labels = np.where(train.labels < 0, -1, 0) if unlabeled else None
    teacher_info = teacher_record(cfg.teacher[0], checkpoint)
    meta = _meta(cfg, store, student, "student", params, teacher_info)
    validate = dev_validator(cfg, store, dev)
    return fit(method_cls(params, student, teacher), train, validate, cfg.engine, out, meta, resume=cfg.resume,
               log=log, train_labels=train_labels)
