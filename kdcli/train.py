"""`teach` and `distill` as library calls: fill in the defaults, take --out's lock, and hand the run to the
trainer of the dataset's task type (tasks/: images, segmentation, slides), which builds data views, models and
the method for the one engine. Everything the CLI does, tests can do by calling these."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.engine.loop import EngineConfig, FitResult
from kdcli.errors import UsageError
from kdcli.methods import METHODS
from kdcli.models.loading import load_model  # noqa: F401 (the training API, as kdcli.train's)
from kdcli.shards.reader import ShardStore
from kdcli.tasks import refuse_foreign_options, task_of
from kdcli.train_config import (  # noqa: F401 (resolve_config: the training API, as kdcli.train's)
    TrainConfig,
    check_out,
    config_to_dict,
    resolve_config,
    unlabeled_choice,
)
from kdcli.train_images import build_student, check_compatible  # noqa: F401 (the training API)


def _task_for_run(cfg: TrainConfig, store: ShardStore):
    """The dataset's task type, after refusing the options it does not take and choosing its selection metric."""
    task = task_of(store.meta)
    refuse_foreign_options(task, embeddings=cfg.embeddings, output_stride=cfg.output_stride)
    if cfg.output_stride and cfg.output_stride not in (8, 16, 32):
        raise UsageError(f"--output-stride {cfg.output_stride}: use 8, 16 or 32")
    if cfg.task and not store.meta.tasks:
        raise UsageError(f"--task {cfg.task}: it picks a label space on datasets with several (fundus-grading); "
                         "this one has one")
    if cfg.engine.metric == EngineConfig.metric:  # left at the engine's default: the task's own
        cfg.engine.metric = task.selection_metric
    return task


def _teach_defaults(cfg: TrainConfig) -> list[str]:
    """--data and --out left out: the one dataset under shards/, and <modality>.pt (or <task>.pt). Returns the
    notes saying so, printed once the output is known to be writable (a refusal stays one line)."""
    from kdcli.defaults import default_teach_out, only_dataset
    from kdcli.shards.format import DatasetMeta

    notes: list[str] = []
    if not cfg.data:
        cfg.data = str(only_dataset())
        notes.append(f"--data not given: using {cfg.data}")
    if not cfg.out:
        modalities = list(DatasetMeta.load(Path(cfg.data)).modalities)
        modality = cfg.modality or (modalities[0] if len(modalities) == 1 else "")
        out = default_teach_out(modality, cfg.task)
        if out is None:
            raise UsageError(f"--modality is required; the dataset has {', '.join(modalities)}")
        cfg.out = str(out)
        notes.append(f"--out not given: writing {cfg.out}")
    return notes


def _distill_defaults(cfg: TrainConfig) -> list[str]:
    """--data, --method and --out left out: the teacher's dataset (checked), the method the data call for, and
    <student>-<method>.pt beside the (first) teacher. Returns the notes saying so, as `_teach_defaults`."""
    from kdcli.defaults import default_distill_out, default_method, recorded_dataset
    from kdcli.shards.format import DatasetMeta

    notes: list[str] = []
    if cfg.method not in ("", "auto"):
        METHODS.get(cfg.method)  # an unknown name is the first thing to say
    if not cfg.teacher:
        raise UsageError("distill needs --teacher (a checkpoint from `kdcli teach`)")
    first = Path(cfg.teacher[0])
    first_meta = load_checkpoint(first).meta
    if not cfg.data:
        cfg.data = str(recorded_dataset(first_meta, first))
        notes.append(f"--data not given: using {cfg.data}, the dataset {first} was trained on")
    if cfg.method in ("", "auto"):
        dataset = DatasetMeta.load(Path(cfg.data))
        teachers = [first_meta, *(load_checkpoint(Path(t)).meta for t in cfg.teacher[1:])]
        cfg.method, why = default_method(dataset, teachers)
        notes.append(f"--method not given: using {cfg.method} ({why})")
    if not cfg.out:
        cfg.out = str(default_distill_out(first, cfg.modality or first_meta["modality"], cfg.method))
        notes.append(f"--out not given: writing {cfg.out}")
    return notes


def teach(cfg: TrainConfig, log: Callable[[str], None] = print) -> FitResult:
    notes = _teach_defaults(cfg)
    with _out_lock(cfg, "teach"):
        return _teach(cfg, notes, log)


def _out_lock(cfg: TrainConfig, command: str):
    """--out's lock, from the check of --out to the publication of the result (rank 0 speaks for all)."""
    from kdcli.engine.distributed import env_rank
    from kdcli.locks import output_lock

    return output_lock(Path(cfg.out), f"kdcli {command} --out {cfg.out}", enabled=bool(cfg.out) and env_rank() == 0)


def _teach(cfg: TrainConfig, notes: list[str], log: Callable[[str], None]) -> FitResult:
    check_out(cfg)  # before anything is read: a refused --out is the first thing to say
    for note in notes:
        log(note)
    store = ShardStore(cfg.data)
    task = _task_for_run(cfg, store)
    cfg.method = task.supervised_method
    return task.run("teach", cfg, store, log)


def distill(cfg: TrainConfig, log: Callable[[str], None] = print) -> FitResult:
    notes = _distill_defaults(cfg)
    with _out_lock(cfg, "distill"):
        return _distill(cfg, notes, log)


def _distill(cfg: TrainConfig, notes: list[str], log: Callable[[str], None]) -> FitResult:
    check_out(cfg)
    for note in notes:
        log(note)
    store = ShardStore(cfg.data)
    method_cls = METHODS.get(cfg.method)
    method_cls.check_task(store.meta.task)
    if cfg.cache_teacher and not method_cls.uses_teacher_outputs:
        raise UsageError(f"--cache-teacher: --method {cfg.method} reads no teacher outputs while it trains (the "
                         "teacher only seeds the student); drop the flag")
    return _task_for_run(cfg, store).run("distill", cfg, store, log)
