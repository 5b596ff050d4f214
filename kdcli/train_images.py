"""Training image models, classification and multi-label alike: `teach` a classifier on one modality, or
`distill` a teacher's into a student with a method (kd, coda, sall, cvi, ...). The task type (tasks/) says what
differs between the two (the supervised method, the targets batches carry, the dev validator)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.engine.checkpoint import Checkpoint, load_checkpoint
from kdcli.engine.device import seed_everything
from kdcli.engine.loop import FitResult, fit, multitask_validator
from kdcli.errors import KdcliError, UsageError
from kdcli.methods import METHODS
from kdcli.methods.base import parse_params
from kdcli.models.classifier import Classifier, default_normalisation, load_pretrained_weights
from kdcli.models.loading import load_model
from kdcli.shards.reader import ShardStore
from kdcli.tasks import task_of
from kdcli.train_config import TrainConfig, check_out, checkpoint_meta, teacher_record, unlabeled_choice


def _concept_bank(cfg: TrainConfig, store: ShardStore) -> tuple[list[str], torch.Tensor]:
    from kdcli.models.concepts import (
        deterministic_embeddings,
        load_concept_embeddings,
        load_concept_texts,
    )

    texts = load_concept_texts(Path(cfg.concepts)) if cfg.concepts else store.meta.extra.get("concepts")
    if not texts:
        raise KdcliError("no concept bank: the dataset has none", path=store.root,
                         hint="pass --concepts FILE (.npy as MultiEYE's concepts_raw.npy, or one per line)")
    if cfg.concept_embeddings:
        vectors = load_concept_embeddings(Path(cfg.concept_embeddings), len(texts))
    else:
        vectors = deterministic_embeddings(texts, cfg.concept_dim)
    return list(texts), torch.from_numpy(vectors)


def build_student(cfg: TrainConfig, store: ShardStore, modality: str, template: dict | None = None,
                  tasks: dict[str, int] | None = None, log: Callable[[str], None] | None = None) -> Classifier:
    """A classifier for `modality`; `template` (the teacher's spec) supplies backbone, head and concepts;
    `tasks` (name -> number of classes) asks for one head per task. The concept scale is this run's
    (`--concept-scale`), not the teacher's: it belongs to the student's own classifier, and the student must
    match its `teach` baseline."""
    store.require_modality(modality)
    channels = store.meta.modalities[modality]["shape"][2]
    mean, std = default_normalisation(channels)
    head = cfg.head if cfg.head != "auto" else (template or {}).get("head") or (
        "concept" if store.meta.extra.get("concepts") else "linear")
    spec: dict[str, Any] = {
        "backbone": cfg.model or (template or {}).get("backbone") or "resnet50",
        "head": head, "in_chans": channels, "num_classes": len(store.meta.classes_for(cfg.task or None)) if not tasks
        else 0, "mean": mean, "std": std,
    }
    stride = cfg.output_stride or (template or {}).get("backbone_kwargs", {}).get("output_stride")
    if stride:
        spec["backbone_kwargs"] = {"output_stride": int(stride)}
    if tasks:
        spec.update(head="multi", tasks=tasks)
        head = "multi"
    concepts = None
    if head == "concept":
        if template and template.get("head") == "concept" and not cfg.concepts:
            texts, concepts = template["concepts"], None  # the teacher's bank; tensors copied below
            spec.update(concepts=texts, concept_dim=template["concept_dim"])
        else:
            texts, concepts = _concept_bank(cfg, store)
            spec.update(concepts=texts, concept_dim=int(concepts.shape[1]))
        if not cfg.concept_scale > 0:
            raise UsageError(f"--concept-scale must be > 0 (got {cfg.concept_scale}); 1 is the official")
        spec["concept_scale"] = float(cfg.concept_scale)
    model = Classifier(spec, concepts)
    if cfg.pretrained:
        report, projection_loaded = load_pretrained_weights(model, cfg.pretrained, cfg.allow_partial)
        if projection_loaded and not cfg.concept_embeddings and not template:
            report += ("; concept embeddings: fixed random vectors, not in the projection's space "
                       "(give the text tower's with --concept-embeddings)")
        (log or print)(report)
    return model


def check_compatible(checkpoint: Checkpoint, store: ShardStore, modality: str | None = None) -> None:
    """A checkpoint is used only on data with its class list and its modality."""
    meta = checkpoint.meta
    wanted_tasks = meta.get("tasks") or ({meta["label_task"]: meta["classes"]} if meta.get("label_task") else {})
    for task, classes in wanted_tasks.items():
        if task not in store.meta.tasks:
            raise KdcliError(f"checkpoint is for task {task!r}; the dataset has "
                             f"{', '.join(store.meta.tasks) or 'no tasks'}", path=checkpoint.path,
                             hint="use it on a dataset prepared with that --task")
        if store.meta.tasks[task]["classes"] != classes:
            raise KdcliError(f"checkpoint {task} classes {classes} differ from the dataset's "
                             f"{store.meta.tasks[task]['classes']}", path=checkpoint.path)
    if not wanted_tasks and store.meta.tasks:
        raise KdcliError(f"checkpoint has one label space; this dataset has several ({', '.join(store.meta.tasks)})",
                         path=checkpoint.path, hint="use a checkpoint from `teach --task` or a multi-task method")
    if not wanted_tasks and meta["classes"] != store.classes:
        raise KdcliError(f"checkpoint classes {meta['classes']} differ from the dataset's {store.classes}",
                         path=checkpoint.path, hint="use a checkpoint trained on this dataset's label set")
    wanted = modality or meta["modality"]
    if wanted not in store.meta.modalities:
        raise KdcliError(f"checkpoint expects modality {wanted!r}; dataset has "
                         f"{', '.join(store.meta.modalities)}", path=checkpoint.path,
                         hint="evaluate it on a dataset with that modality")
    if store.meta.modalities[wanted]["shape"][2] != meta["model"]["in_chans"]:
        raise KdcliError(f"checkpoint takes {meta['model']['in_chans']} channels, {wanted} has "
                         f"{store.meta.modalities[wanted]['shape'][2]}", path=checkpoint.path)


def _views(cfg: TrainConfig, store: ShardStore, pairing: str, teacher_modality: str | None,
           targets: tuple[str, ...] = (), dev_targets: tuple[str, ...] | None = None, unlabeled: bool = False):
    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import ModalityView, PairedView, UnpairedPartnerView

    def augment(modality: str):
        return train_augmentation(store.meta.modalities[modality]["shape"][0], cfg.augment)

    seed = cfg.engine.seed
    tasks = [cfg.task] if cfg.task else None
    # unlabeled rows join a plain view only for a method that reads them (pairing "none": CVI's KL)
    student_train = ModalityView(store, "train", cfg.modality, augment(cfg.modality), seed, tasks, targets,
                                 unlabeled=unlabeled and pairing == "none")
    if dev_targets is None:  # the labels only: dev items without maps are read and collated in whole batches
        dev_targets = ("labels",) if "labels" in targets else ()
    dev = ModalityView(store, "dev", cfg.modality, tasks=tasks, targets=dev_targets)
    if len(student_train) == 0 or len(dev) == 0:
        raise KdcliError(f"no {cfg.modality} samples in train or dev", path=store.root)
    if pairing == "unpaired":
        partner = ModalityView(store, "train", teacher_modality, augment(teacher_modality), seed + 1)
        return UnpairedPartnerView(student_train, partner, seed), dev, student_train.labels
    if pairing == "paired":
        view = PairedView(store, "train", cfg.modality, teacher_modality, augment(cfg.modality),
                          augment(teacher_modality), seed, unlabeled=unlabeled)
        return view, dev, view.labels
    return student_train, dev, student_train.labels


def _meta(cfg: TrainConfig, store: ShardStore, model: Classifier, kind: str, params: Any,
          teacher: dict | list | None) -> dict[str, Any]:
    tasks = model.spec.get("tasks")
    return checkpoint_meta(
        cfg, store, model.spec, kind, params, teacher,
        classes=[] if tasks else store.meta.classes_for(cfg.task or None), label_task=cfg.task or None,
        tasks={t: store.meta.tasks[t]["classes"] for t in tasks} if tasks else None,
        size=store.meta.modalities[cfg.modality]["shape"][0])


def teach_images(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    task = task_of(store.meta)
    if not cfg.modality and len(store.meta.modalities) == 1:
        cfg.modality = next(iter(store.meta.modalities))
    if not cfg.modality:
        raise UsageError(f"--modality is required; the dataset has {', '.join(store.meta.modalities)}")
    if store.meta.tasks and cfg.task not in store.meta.tasks:
        raise UsageError(f"--task is required: this dataset has {', '.join(store.meta.tasks)}")
    cfg.method = task.supervised_method
    seed_everything(cfg.engine.seed)  # before the model is built: its initial weights depend on it
    method_cls = METHODS.get(cfg.method)
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    model = build_student(cfg, store, cfg.modality, log=log)
    train_set, dev_set, labels = _views(cfg, store, "none", None, task.label_targets)
    meta = _meta(cfg, store, model, "teacher", params, None)
    validate = _validator(cfg, store, dev_set)  # refuses an unusable dev split before anything is written
    return fit(method_cls(params, model), train_set, validate, cfg.engine, out, meta, resume=cfg.resume, log=log,
               train_labels=labels)


def distill_images(cfg: TrainConfig, store: ShardStore, log: Callable[[str], None]) -> FitResult:
    out = check_out(cfg)
    method_cls = METHODS.get(cfg.method)
    if not method_cls.per_task_teachers and len(cfg.teacher) != 1:
        raise UsageError(f"--method {cfg.method} takes exactly one --teacher checkpoint")
    params = parse_params(method_cls.Params, cfg.params, cfg.method)
    seed_everything(cfg.engine.seed)
    checkpoints = [load_checkpoint(Path(path)) for path in cfg.teacher]
    for checkpoint in checkpoints:
        check_compatible(checkpoint, store)
    teachers = [load_model(checkpoint) for checkpoint in checkpoints]
    teacher_modality = checkpoints[0].meta["modality"]
    cfg.modality = cfg.modality or teacher_modality
    if not cfg.modality:
        raise UsageError(f"--student is required; the dataset has {', '.join(store.meta.modalities)}")
    teacher_info = [teacher_record(path, c) for path, c in zip(cfg.teacher, checkpoints, strict=True)]
    if method_cls.per_task_teachers:
        return _distill_per_task(cfg, store, method_cls, params, checkpoints, teachers, teacher_info, out, log)
    if method_cls.pairing == "paired" and store.meta.pairing != "paired":
        raise KdcliError(f"--method {cfg.method} needs paired data; this dataset is {store.meta.pairing}",
                         path=store.root, hint="use --method coda for unpaired data")
    cfg.task = cfg.task or checkpoints[0].meta.get("label_task") or ""
    teacher = teachers[0]
    seed_everything(cfg.engine.seed)  # the student starts from the very weights its teach-baseline starts from
    student = method_cls.make_student(params, teacher)
    if student is None:
        student = build_student(cfg, store, cfg.modality, template=teacher.spec, log=log)
    if student.spec.get("head") == "concept" and teacher.spec.get("head") == "concept" and not cfg.concepts:
        student.head.concepts.copy_(teacher.head.concepts)
    method = method_cls(params, student, teacher if method_cls.uses_teacher_outputs else None)
    method_cls.check_data(store.meta)
    targets = method_cls.targets or task_of(store.meta).label_targets
    missing = [t for t in targets if t not in store.meta.targets]
    if missing:
        raise KdcliError(f"--method {cfg.method} needs {', '.join(missing)} in the data", path=store.root,
                         hint="prepare the dataset with them (e.g. prepare cxr --gaze/--boxes)")
    unlabeled = unlabeled_choice(cfg, store, method_cls, log)
    train_set, dev_set, labels = _views(cfg, store, method_cls.pairing, teacher_modality, targets,
                                        method_cls.dev_targets, unlabeled)
    for note in getattr(train_set, "notes", []):
        log(f"note: {note}")
    rows = method.train_rows(train_set)
    if rows is not None:  # e.g. CVI's stage 2 on the annotated subset
        train_set, labels = _Rows(train_set, rows), labels[rows]
    if cfg.cache_teacher:
        train_set = _with_teacher_cache(cfg, store, train_set, {"teacher": teacher}, teacher_info, teacher_modality)
    meta = _meta(cfg, store, student, "student", params, teacher_info[0])
    validate = _validator(cfg, store, dev_set)  # sets the task's selection metric too; before anything is written
    from kdcli.engine.distributed import env_rank

    say = log if env_rank() == 0 else (lambda message: None)  # under torchrun rank 0 speaks for all
    validate = method.make_validator(dev_set, store.meta.classes, cfg.engine, say) or validate
    result = fit(method, train_set, validate, cfg.engine, out, meta, resume=cfg.resume, log=log,
                 train_labels=labels)
    for line in method.fit_notes(result.history):
        say(line)
    return result


class _Rows(torch.utils.data.Subset):
    """Some rows of a training view, which still hears of the epoch (its augmentation draws depend on it)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def _validator(cfg: TrainConfig, store: ShardStore, dev_set):
    return task_of(store.meta).run("validator", cfg, store, dev_set)


def _distill_per_task(cfg, store, method_cls, params, checkpoints, teachers, teacher_info, out, log) -> FitResult:
    """One single-task teacher per task (SALL): the student is one backbone with a head per task."""
    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import ModalityView

    tasks = [c.meta.get("label_task") for c in checkpoints]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise UsageError(f"--method {cfg.method} needs one teacher per task, each from `teach --task`; got "
                         f"tasks {tasks}")
    heads = {task: len(store.meta.tasks[task]["classes"]) for task in tasks}
    seed_everything(cfg.engine.seed)
    student = build_student(cfg, store, cfg.modality, template={**teachers[0].spec, "head": "linear"}, tasks=heads,
                            log=log)
    method = method_cls(params, student, dict(zip(tasks, teachers, strict=True)))
    augment = train_augmentation(store.meta.modalities[cfg.modality]["shape"][0], cfg.augment)
    train_set = ModalityView(store, "train", cfg.modality, augment, cfg.engine.seed, tasks)
    if cfg.cache_teacher:
        train_set = _with_teacher_cache(cfg, store, train_set, dict(zip(tasks, teachers, strict=True)), teacher_info,
                                        cfg.modality, tasks)
    dev_sets = {task: ModalityView(store, "dev", cfg.modality, tasks=[task]) for task in tasks}
    meta = _meta(cfg, store, student, "student", params, teacher_info)
    validate = multitask_validator(dev_sets, {t: store.meta.tasks[t] for t in tasks}, cfg.engine)
    plain = train_set.base if cfg.cache_teacher else train_set
    balance_key = plain.tasks * 1000 + plain.labels  # balance grades within each task's set
    return fit(method, train_set, validate, cfg.engine, out, meta, resume=cfg.resume, log=log,
               train_labels=np.unique(balance_key, return_inverse=True)[1])


def _with_teacher_cache(cfg: TrainConfig, store: ShardStore, train_set, teachers: dict, teacher_info: list[dict],
                        modality: str, tasks: list[str] | None = None):
    """Wrap the training view so each item carries its teacher input's cached outputs (built once)."""
    from kdcli.data.views import ModalityView
    from kdcli.engine import teacher_cache
    from kdcli.engine.device import select_device

    # un-augmented, the very rows teacher_index points at: a paired view's teacher side holds unlabeled rows too
    teacher_side = getattr(train_set, "teacher", None) or getattr(train_set, "partner", None) or train_set
    every_row = bool(getattr(teacher_side, "unlabeled", False))
    inputs = ModalityView(store, "train", modality, tasks=tasks, unlabeled=every_row)
    path = teacher_cache.cache_path(store.root, [t["sha256"] for t in teacher_info],
                                    modality + ("+unlabeled" if every_row else ""))
    if not path.is_file():
        device = select_device(cfg.engine.device)
        for model in teachers.values():
            model.to(device)
        teacher_cache.build(teachers, inputs, path, store.meta.content_hash, device, cfg.engine.batch_size)
    return teacher_cache.CachedTeacherView(train_set, teacher_cache.load(path, store.meta.content_hash, len(inputs)))
