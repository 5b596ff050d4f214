"""The one training loop under `teach` and `distill`: every method, every dataset.

Per epoch: train the method's loss terms, evaluate the student on the dev split, log metrics (JSONL and
CSV), keep `last` (with optimizer state, for --resume) and `best` (by `metric`), stop early on patience.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint, sibling
from kdcli.engine.device import amp_dtype, deterministic_mode, seed_everything, select_device
from kdcli.engine.distributed import Ranks, RankShard, mean_across_ranks, setup, teardown
from kdcli.engine.progress import batch_progress
from kdcli.engine.publish import public_path, staged_result, write_config
from kdcli.engine.resume import check_resume
from kdcli.engine.threads import LoadWatch, ThreadChoice
from kdcli.engine.trackers import Trackers, parse_log
from kdcli.errors import KdcliError, UsageError, write_failure
from kdcli.storage import atomic_write


@dataclass
class EngineConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # after warm-up: cosine | poly | constant
    min_lr: float = 1e-6
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    threads: int = 0  # torch intra-op threads; 0: chosen from the CPUs left free (kdcli.engine.threads)
    amp: str = "auto"
    channels_last: str = "auto"
    deterministic: str = "auto"  # on | off | auto (on for CPU, off on CUDA: cudnn autotuning)
    compile: bool = False
    grad_clip: float = 0.0
    accumulate: int = 1
    ema: float = 0.0
    patience: int = 0
    metric: str = "macro_f1"
    balanced: bool = True
    samples_per_epoch: int = 0  # 0 = the training set's size (labelled samples x (1 + unlabeled_ratio))
    unlabeled_ratio: float = 1.0  # unlabeled samples drawn per labelled one, when the training set has any
    log_every: int = 0  # batches between progress lines when stderr is not a terminal; 0: about 10 per epoch
    log: str = ""  # trackers besides the CSV/JSONL logs, comma-separated KIND[=DIR/URI]: tensorboard, mlflow

    def __post_init__(self) -> None:  # refused before anything is written, not at the first epoch
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name}={getattr(self, name)!r}: use {', '.join(allowed)}")
        for name, (low, high, closed, rule) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"{name}={value!r}: {rule}")
            if value < low or (high is not None and (value > high if closed else value >= high)):
                raise UsageError(f"{name}={value!r}: {rule}")
        parse_log(self.log)  # an unknown tracker or a missing package: one line before anything is written


CHOICES = {"amp": ("auto", "off", "bf16", "fp16"), "channels_last": ("auto", "on", "off"),
           "deterministic": ("auto", "on", "off"), "schedule": ("cosine", "poly", "constant")}
_TINY = math.ulp(0.0)  # the smallest float above zero: "greater than zero"
# name -> (lowest allowed, highest or None, highest allowed itself?, what to say)
RANGES = {
    "epochs": (1, None, True, "at least 1 (0 would write an untrained checkpoint)"),
    "batch_size": (1, None, True, "at least 1"),
    "lr": (_TINY, None, True, "a learning rate above 0"),
    "weight_decay": (0, None, True, "0 or more"),
    "warmup_epochs": (0, None, True, "0 or more"),
    "min_lr": (0, None, True, "0 or more"),
    "workers": (0, None, True, "0 or more worker processes"),
    "threads": (0, None, True, "0 (chosen from the free CPUs) or a number of threads"),
    "log_every": (0, None, True, "0 (about 10 lines per epoch) or a number of batches"),
    "grad_clip": (0, None, True, "0 (off) or a norm above 0"),
    "accumulate": (1, None, True, "at least 1 step"),
    "ema": (0, 1, False, "a decay in [0, 1): 0 is off, 0.999 typical"),
    "patience": (0, None, True, "0 (off) or more epochs"),
    "samples_per_epoch": (0, None, True, "0 (the training set's size) or more"),
    "unlabeled_ratio": (0, None, True, "0 or more unlabeled samples per labelled one"),
}


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    epochs_run: int
    history: list[dict[str, Any]]
    seconds: float


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch generator's seed for one epoch's training steps (distinct from the data's (seed, epoch) draws)."""
    return (seed * 1_000_033 + epoch * 7_919 + 17) % 2**63


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Multiplier for LambdaLR: linear warm-up, then half-cycle cosine down to min_lr (MultiEYE's schedule)."""
    return lr_multiplier("cosine", step, total, warmup, base_lr, min_lr)


def lr_multiplier(schedule: str, step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up, then `cosine` (half cycle down to min_lr; MultiEYE), `poly` ((1 - progress)^0.9, floored
    at min_lr; nnU-Net and ProtoKD's teacher and baseline) or `constant` (ProtoKD's student in practice)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / base_lr
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return max(floor, (1 - progress) ** 0.9)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_loader(dataset: Dataset, cfg: EngineConfig, device: torch.device, labels: np.ndarray | None,
                train: bool, ranks: Ranks | None = None) -> DataLoader:
    sampler = None
    if train:
        num_samples = cfg.samples_per_epoch or len(dataset)
        unlabeled = labels is not None and bool((labels < 0).any())
        if unlabeled:  # an epoch: every labelled sample's worth, plus the unlabeled share on top
            num_samples = cfg.samples_per_epoch or round(int((labels >= 0).sum()) * (1 + cfg.unlabeled_ratio))
        if (cfg.balanced or unlabeled) and labels is not None:
            from kdcli.data.views import class_balanced_sampler

            sampler = class_balanced_sampler(labels, num_samples, cfg.seed, cfg.unlabeled_ratio, cfg.balanced)
        else:
            sampler = RandomSampler(dataset, num_samples=num_samples,
                                    generator=torch.Generator().manual_seed(cfg.seed))
        if ranks is not None and ranks.distributed:
            sampler = RankShard(sampler, ranks)
    from kdcli.data.views import collate

    # views with items of their own shape (slide bags) bring their own collate
    collate_fn = getattr(getattr(dataset, "dataset", dataset), "collate", None) or collate
    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, shuffle=False, num_workers=cfg.workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda", drop_last=train and len(dataset) >= cfg.batch_size,
        persistent_workers=cfg.workers > 0, worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, dict):  # e.g. cached teacher outputs, one dict per teacher
            value = to_device(value, device, False)
        elif isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.ndim == 4:  # loaders hand over NHWC memory; on a GPU the layout change runs on the device
                layout = torch.channels_last if channels_last else torch.contiguous_format
                value = value.contiguous(memory_format=layout)
        moved[key] = value
    return moved


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device,
            dtype: torch.dtype | None = None, head: str | None = None,
            multilabel: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Probabilities, labels and any extra outputs (e.g. concept similarities) over a loader; `head` picks one
    task's logits from a multi-head model. Multi-label: sigmoid probabilities and the label vectors."""
    model.eval()
    probs, labels, extras = [], [], defaultdict(list)
    for batch in loader:
        batch = to_device(batch, device, False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch["image"])
        logits = (out["task_logits"][head] if head else out["logits"]).float()
        probs.append((logits.sigmoid() if multilabel else logits.softmax(1)).cpu().numpy())
        labels.append(batch["labels" if multilabel else "label"].cpu().numpy())
        if "sims" in out:
            extras["sims"].append(out["sims"][:, 0].float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels), {k: np.concatenate(v) for k, v in extras.items()}


class MetricsLog:
    def __init__(self, out: Path, resume: bool):
        self.jsonl, self.csv = sibling(out, ".metrics.jsonl"), sibling(out, ".metrics.csv")
        if not resume:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        size = self.jsonl.stat().st_size if self.jsonl.exists() else 0
        try:
            with open(self.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        except BaseException as exc:  # no half line for a later --resume to choke on
            if self.jsonl.exists():
                with open(self.jsonl, "r+b") as handle:
                    handle.truncate(size)
            raise write_failure(exc, self.jsonl) or exc from None
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        columns = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.csv, write_csv)


Validate = Callable[[torch.nn.Module, torch.device, "torch.dtype | None"], dict]


def predict_sharded(model: torch.nn.Module, dataset: Dataset, cfg: EngineConfig, device: torch.device,
                    dtype: torch.dtype | None, head: str | None = None,
                    multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """predict() over the whole dataset; under torchrun each rank predicts every world-th sample and the pieces
    are gathered, so every rank computes the same metrics from all of them."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        probs, labels, _ = predict(model, make_loader(dataset, cfg, device, None, train=False), device, dtype, head,
                                   multilabel)
        return probs, labels
    rank = dist.get_rank()
    indices = list(range(rank, len(dataset), world))
    mine = None  # a rank with no sample (dev split smaller than the world) contributes nothing
    if indices:
        subset = torch.utils.data.Subset(dataset, indices)
        probs, labels, _ = predict(model, make_loader(subset, cfg, device, None, train=False), device, dtype, head,
                                   multilabel)
        mine = (indices, probs, labels)
    pieces: list = [None] * world
    dist.all_gather_object(pieces, mine)
    pieces = [p for p in pieces if p is not None]
    order = np.argsort(np.concatenate([p[0] for p in pieces]))
    return np.concatenate([p[1] for p in pieces])[order], np.concatenate([p[2] for p in pieces])[order]


def classification_validator(dev_set: Dataset, classes: list[str], cfg: EngineConfig,
                             ordinal: bool = False) -> Validate:
    """Dev-split metrics for a single-head classifier (what every classification method is selected by)."""
    from kdcli.metrics.classification import classification_metrics

    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        probs, labels = predict_sharded(model, dev_set, cfg, device, dtype)
        return classification_metrics(labels, probs, classes, ordinal=ordinal)

    validate.samples = len(dev_set)  # for the start-up line
    return validate


def multilabel_validator(dev_set: Dataset, classes: list[str], cfg: EngineConfig) -> Validate:
    """Dev-split per-label AUROC; `mean_auroc` selects the best epoch."""
    from kdcli.metrics.classification import multilabel_metrics

    check_dev_labels(dev_set, classes)

    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        probs, targets = predict_sharded(model, dev_set, cfg, device, dtype, multilabel=True)
        return multilabel_metrics(targets, probs, classes)

    validate.samples = len(dev_set)
    return validate


def check_dev_labels(dev_set: Dataset, classes: list[str]) -> None:
    """Before any training: a dev split where no label has both outcomes leaves every selection metric (mean
    AUROC, AP, F1) undefined, so no epoch could ever be chosen as the best."""
    from kdcli.metrics.classification import IGNORE

    store = getattr(dev_set, "store", None)
    if store is None or "labels" not in getattr(dev_set, "targets", ()):
        return
    targets = np.stack([store.read(shard, int(index), "labels")
                        for shard, index in zip(dev_set.shards, dev_set.indices, strict=True)]) \
        if len(dev_set) else np.zeros((0, len(classes)), np.uint8)
    known = targets != IGNORE
    positives, negatives = ((targets == 1) & known).any(axis=0), ((targets == 0) & known).any(axis=0)
    if not (positives & negatives).any():
        raise KdcliError(f"the dev split ({len(dev_set)} images) has no label with both positive and negative "
                         "images, so dev AUROC/AP/F1 are undefined and no epoch could be selected", path=store.root,
                         hint="prepare more images, or give dev a larger share (cxr: --dev-fraction)")


def multitask_validator(dev_sets: dict[str, Dataset], tasks: dict[str, dict], cfg: EngineConfig) -> Validate:
    """Per-task dev metrics of a multi-head model; the selection metrics are the means over tasks."""
    from kdcli.metrics.classification import classification_metrics

    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        per_task = {}
        for task, dataset in dev_sets.items():
            probs, labels = predict_sharded(model, dataset, cfg, device, dtype, head=task)
            per_task[task] = classification_metrics(labels, probs, tasks[task]["classes"],
                                                    ordinal=tasks[task].get("ordinal", False))
        means = {k: float(np.mean([m[k] for m in per_task.values()])) for k in ("accuracy", "macro_f1", "kappa")}
        flat = {f"{task}_{k}": m[k] for task, m in per_task.items() for k in ("accuracy", "macro_f1", "kappa")}
        return {**means, **flat, "tasks": per_task}

    validate.samples = sum(len(dataset) for dataset in dev_sets.values())
    return validate


def fit(method: torch.nn.Module, train_set: Dataset, validate: Validate, cfg: EngineConfig, out: Path,
        meta: dict[str, Any], resume: bool = False,
        log: Callable[[str], None] = print, train_labels: np.ndarray | None = None) -> FitResult:
    from kdcli.engine.distributed import local_world_size
    from kdcli.engine.threads import choose_threads, torch_threads
    from kdcli.provenance import provenance

    started = time.perf_counter()
    device = select_device(cfg.device)
    seed_everything(cfg.seed, deterministic_mode(device, cfg.deterministic))
    if resume:  # before anything is written: a --resume of another run is refused
        check_resume(out, meta)
    meta.setdefault("provenance", provenance())
    threads = choose_threads(cfg.threads, cfg.workers, processes=local_world_size())
    ranks = setup(device)
    trackers = Trackers(cfg.log if ranks.is_main else "", out, meta.get("config") or {})
    try:
        # the result (checkpoint, config, metrics, last state) is published as a whole, or not at all
        with torch_threads(threads), staged_result(out, resume, writer=ranks.is_main) as work:
            if ranks.is_main and "config" in meta:
                write_config(work, {**meta["config"], "provenance": meta["provenance"]})
            try:
                return _fit(method, train_set, validate, cfg, work, meta, resume,
                            log if ranks.is_main else _silent, train_labels, device, ranks, started, threads,
                            trackers)
            finally:
                # a sidecar like the others: published with the checkpoint, or discarded with a failed
                # --overwrite run; a failed first run keeps its curves of the epochs so far
                if ranks.is_main:
                    _draw_curves(work, cfg, method, log,
                                 f"{Path(out).name}: {meta.get('method')} on {meta.get('modality')}")
    finally:
        trackers.close()
        teardown(ranks)


def _silent(message: str) -> None:
    pass


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def startup_line(method: torch.nn.Module, meta: dict[str, Any], cfg: EngineConfig, device: torch.device,
                 dtype: torch.dtype | None, threads: ThreadChoice, train_set: Dataset, validate: Validate,
                 train_loader: DataLoader, out: Path) -> str:
    """One line saying what is about to train, on what, with which settings: the first thing a log shows."""
    student = sum(p.numel() for p in method.student.parameters())
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    teacher = sum(p.numel() for model in method.teachers() for p in model.parameters())
    summed = [term for term in getattr(method, "terms", ()) if not term.startswith("_")]
    dev = getattr(validate, "samples", None)
    verb = "distill" if meta.get("kind") == "student" else "teach"
    return (f"{verb} {meta.get('modality')} -> {out}: method {meta.get('method')} "
            f"(loss {' + '.join(summed) or 'of the method'}); {device}, AMP "
            f"{ {None: 'off', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]}, {threads.describe()}; "
            f"{millions(student)} parameters ({millions(trainable)} trainable"
            f"{f', teacher {millions(teacher)} frozen' if teacher else ''}); train {len(train_set)} / dev "
            f"{dev if dev is not None else '?'} samples; {len(train_loader)} batches of {cfg.batch_size} per epoch, "
            f"{cfg.epochs} epochs")


def _draw_curves(out: Path, cfg: EngineConfig, method: torch.nn.Module, log: Callable[[str], None],
                 title: str) -> None:
    """<out>.curves.png; a figure that cannot be drawn is said in one line, never the run's failure."""
    from kdcli.engine.curves import write_curves

    diagnostics = tuple(term for term in getattr(method, "terms", ()) if term.startswith("_"))
    try:
        write_curves(out, cfg.metric, title, diagnostics)
    except Exception as exc:  # matplotlib's own errors, a full disk: the checkpoint is what matters
        log(f"note: training curves not drawn ({type(exc).__name__}: {exc})")


def _fit(method, train_set, validate, cfg, out, meta, resume, log, train_labels, device, ranks, started,
         threads, trackers) -> FitResult:
    dtype = amp_dtype(device, cfg.amp)
    # channels_last: tensor cores on CUDA, oneDNN's preferred layout on CPU (teach ran 1.2x faster, U-Nets ~2x);
    # the loaders already hand batches over in that memory order
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cuda", "cpu"))
    method.to(device)
    method.teacher_to(device)
    student = method.student
    if channels_last:
        method.to(memory_format=torch.channels_last)
        method.teacher_to(device, torch.channels_last)
    if cfg.compile:
        method.__dict__["compiled"] = torch.compile(student)
    step_fn = method
    if ranks.distributed:
        # find_unused_parameters: heads such as the concept projection only train under some methods
        step_fn = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    train_loader = make_loader(train_set, cfg, device, train_labels, train=True, ranks=ranks)
    steps_per_epoch = max(1, len(train_loader) // cfg.accumulate)
    total_steps = steps_per_epoch * cfg.epochs
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg.schedule, step, total_steps, warmup, cfg.lr, cfg.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    check_every = 1 if device.type == "cpu" else 25
    ema = None
    if cfg.ema:
        # use_buffers: BatchNorm statistics are averaged too, else the EMA model validates with initial ones
        ema = torch.optim.swa_utils.AveragedModel(
            student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

    last_path = sibling(out, ".last.pt")
    if resume and not last_path.is_file():  # before the start-up line: a refusal stays one line
        raise KdcliError("nothing to resume", path=last_path, hint="drop --resume to start a new run")
    log(startup_line(method, meta, cfg, device, dtype, threads, train_set, validate, train_loader,
                     public_path(out)))
    load_watch = LoadWatch(threads) if ranks.world == 1 else None
    metrics_log = MetricsLog(out, resume) if ranks.is_main else None
    if trackers.items:
        log(f"tracking: {trackers.describe()}")
    start_epoch, best_epoch, best_value, history, stale = 0, -1, -math.inf, [], 0
    if resume:
        last = load_checkpoint(last_path)
        try:
            method.load_state_dict(last.state["method"])
            optimizer.load_state_dict(last.state["optimizer"])
            scheduler.load_state_dict(last.state["scheduler"])
            if ema is not None and "ema" in last.state:
                ema.load_state_dict(last.state["ema"])
        except (KeyError, RuntimeError, ValueError) as exc:  # a state of another architecture or optimizer
            raise KdcliError(f"its training state does not fit this run ({str(exc).splitlines()[0][:160]})",
                             path=last_path, hint="resume with the options it was started with, or pass "
                                                  "--overwrite instead of --resume to start a new run") from None
        start_epoch = int(last.state["epoch"]) + 1
        best_epoch, best_value = int(last.state["best_epoch"]), float(last.state["best_value"])
        stale = int(last.state.get("stale", 0))
        log(f"resuming at epoch {start_epoch + 1}/{cfg.epochs} (best {cfg.metric} {best_value:.4f})")

    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        if hasattr(train_loader.sampler, "generator") and train_loader.sampler.generator is not None:
            train_loader.sampler.generator.manual_seed(cfg.seed * 1000 + epoch)
        # The step's own draws (dropout, CVI's reparameterisation, hidden clinical records) restart from a seed of
        # (seed, epoch) too, so a run resumed at an epoch boundary repeats the uninterrupted one bit for bit.
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        method.train()
        for teacher in method.teachers():
            teacher.eval()
        sums: dict[str, float] = defaultdict(float)
        batches, seen, epoch_start = 0, 0, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        later = (cfg.epochs - epoch - 1) * len(train_loader)
        with batch_progress(len(train_loader), f"epoch {epoch + 1}/{cfg.epochs}", log, cfg.log_every,
                            later) as advance:
            for step, batch in enumerate(train_loader):
                batch = to_device(batch, device, channels_last)
                # how far training is, for methods with schedules of their own (CVI's KL annealing)
                total_batches = max(1, cfg.epochs * len(train_loader))
                method.__dict__["progress"] = (epoch * len(train_loader) + step) / total_batches
                method.__dict__["epoch"] = epoch  # from 0, for schedules counted in epochs (DKD's warm-up)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    terms = step_fn(batch)
                loss = sum(v for k, v in terms.items() if not k.startswith("_"))
                # Reading a GPU value waits for the GPU, so the finiteness check runs every `check_every` steps
                # there (every step on the CPU, where it is free); the running sums stay on the device.
                if step % check_every == 0 and not torch.isfinite(loss):
                    raise KdcliError(f"loss became {loss.item()} at epoch {epoch + 1}",
                                     hint="lower --lr, or try --amp off")
                scaler.scale(loss / cfg.accumulate).backward()
                if (step + 1) % cfg.accumulate == 0:
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                    scale = scaler.get_scale() if scaler.is_enabled() else None
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if scale is None or scaler.get_scale() >= scale:  # fp16 overflow skipped the step
                        scheduler.step()
                    if ema is not None:
                        ema.update_parameters(student)
                for key, value in terms.items():
                    sums[key] += value.detach().float()
                sums["loss"] += loss.detach().float()
                batches += 1
                seen += len(batch["label"])
                advance(len(batch["label"]))
        train_seconds = time.perf_counter() - epoch_start
        sums = {key: float(value) for key, value in sums.items()}
        if not math.isfinite(sums.get("loss", 0.0)):
            raise KdcliError(f"loss became {sums['loss']} during epoch {epoch + 1}",
                             hint="lower --lr, or try --amp off")
        sums = mean_across_ranks(sums, ranks, device)
        seen *= ranks.world

        eval_model = ema.module if ema is not None else student
        dev = validate(eval_model, device, dtype)
        if cfg.metric not in dev:
            raise KdcliError(f"--set metric={cfg.metric} is not reported here; choose one of "
                             f"{', '.join(k for k, v in dev.items() if isinstance(v, float))}")
        value = dev[cfg.metric]
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **{f"train_{k.lstrip('_')}": v / max(1, batches) for k, v in sums.items()},
               **{f"dev_{k}": v for k, v in dev.items() if isinstance(v, (int, float)) or v is None},
               "train_samples_per_s": seen / max(train_seconds, 1e-9)}
        history.append(row)
        if metrics_log is not None:
            metrics_log.write(row)
        trackers.log(row, epoch + 1)
        improved = value is not None and value > best_value
        if improved:
            best_epoch, best_value, stale = epoch + 1, value, 0
            summary = {k: dev[k] for k in ("accuracy", "macro_f1", "kappa", "auc", "mean_auroc", "dice_mean",
                                             "dice_wt", "dice_tc", "dice_et") if k in dev}
            best = {"epoch": epoch + 1, "metric": cfg.metric, "value": value, "dev": summary}
            if ranks.is_main:
                save_checkpoint(out, {**meta, "best": best}, eval_model.state_dict())
        else:
            stale += 1
        if ranks.is_main:
            state = {"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best_epoch": best_epoch,
                     "best_value": best_value, "stale": stale,
                     **({"ema": ema.state_dict()} if ema is not None else {})}
            save_checkpoint(last_path, {**meta, "last_epoch": epoch + 1, "world_size": ranks.world},
                            eval_model.state_dict(), state)
        shown = "undefined" if value is None else f"{value:.4f}"  # e.g. AUC on a dev split of one class
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  dev {cfg.metric} {shown}"
            f"{'  *' if improved else ''}  ({seen / max(train_seconds, 1e-9):.0f} img/s)")
        changed = load_watch.update() if load_watch is not None else None
        if changed is not None:
            torch.set_num_threads(changed.threads)
            log(f"{changed.describe()} from epoch {epoch + 2}: the load on this machine changed")
        if cfg.patience and stale >= cfg.patience:
            log(f"early stop: no {cfg.metric} gain for {cfg.patience} epochs")
            break
    if best_epoch < 0:
        raise KdcliError(f"dev {cfg.metric} was undefined at every epoch, so no best checkpoint was written",
                         path=out, hint="prepare a larger dev split, or select by another metric (--set metric=)")
    return FitResult(best_epoch, best_value, len(history), history, time.perf_counter() - started)


def config_dict(cfg: EngineConfig) -> dict[str, Any]:
    return asdict(cfg)
