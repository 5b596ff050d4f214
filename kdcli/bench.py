"""`kdcli bench`: measured comparisons against the naive way, in the same run, on the user's machine.

bench loader SHARDS   samples/s of kdcli's shard loader vs a folder of PNG files read with PIL (the same
                      augmentation, the same DataLoader settings), with 0, 1 and N workers, and vs plain h5py
                      reads without augmentation (the storage limit).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class LoaderBenchOptions:
    data: Path
    modality: str | None = None
    split: str = "train"
    batch_size: int = 64
    workers: tuple[int, ...] = ()
    repeats: int = 2
    augment: str = "light"


class PngFolder(Dataset):
    """The naive way: one PNG per sample, decoded with PIL, then the same augmentation as kdcli (the same
    FusedAugment, called per sample as a torchvision-style dataset would)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, augment):
        self.paths, self.labels, self.augment = paths, labels, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        array = np.asarray(Image.open(self.paths[i]))
        array = array[:, :, None] if array.ndim == 2 else array
        if self.augment is not None:
            array = self.augment(image=array)["image"]
            array = array[:, :, None] if array.ndim == 2 else array
        return {"image": torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),
                "label": int(self.labels[i])}


MIN_SECONDS = 1.0  # each measurement runs at least this long: a few hundred samples take milliseconds


def _rate(dataset: Dataset, batch_size: int, workers: int, repeats: int) -> float:
    """Samples/s over at least `repeats` passes and MIN_SECONDS."""
    from kdcli.data.views import collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=collate)
    for _ in loader:  # warm-up pass: worker start-up, file handles, page cache
        break
    started, seen, passes = time.perf_counter(), 0, 0
    while passes < repeats or time.perf_counter() - started < MIN_SECONDS:
        for batch in loader:
            seen += len(batch["label"])
        passes += 1
    return seen / (time.perf_counter() - started)


def _h5py_rate(view, repeats: int) -> float:
    import h5py

    handles: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    started, passes = time.perf_counter(), 0
    while passes < repeats or time.perf_counter() - started < MIN_SECONDS:
        for shard, index in zip(view.shards, view.indices, strict=True):
            if shard not in arrays:
                handles[shard] = h5py.File(view.store.root / "shards" / shard, "r")
                arrays[shard] = handles[shard][view.modality]
            arrays[shard][int(index)]
        passes += 1
    rate = passes * len(view) / (time.perf_counter() - started)
    for handle in handles.values():
        handle.close()
    return rate


def bench_loader(options: LoaderBenchOptions, log=print) -> dict[str, Any]:
    import cv2

    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import ModalityView
    from kdcli.shards.reader import ShardStore

    store = ShardStore(options.data)
    modality = options.modality or next(iter(store.meta.modalities))
    size = store.meta.modalities[modality]["shape"][0]
    augment = train_augmentation(size, options.augment)
    view = ModalityView(store, options.split, modality, augment)
    plain_view = ModalityView(store, options.split, modality)
    workers = options.workers or tuple(sorted({0, 1, os.cpu_count() or 1}))
    results: dict[str, Any] = {"samples": len(view), "modality": modality, "size": size, "rows": []}
    with tempfile.TemporaryDirectory(prefix="kdcli-bench-") as folder:
        paths = []
        for i in range(len(plain_view)):  # export once, untimed: the naive way's starting point
            array = plain_view.image(i)
            path = Path(folder) / f"{i:06d}.png"
            cv2.imwrite(str(path), array[:, :, ::-1] if array.shape[2] == 3 else array)
            paths.append(path)
        naive = PngFolder(paths, plain_view.labels, augment)
        for count in workers:
            kdcli_rate = _rate(view, options.batch_size, count, options.repeats)
            naive_rate = _rate(naive, options.batch_size, count, options.repeats)
            row = {"workers": count, "kdcli": kdcli_rate, "png_pil": naive_rate, "ratio": kdcli_rate / naive_rate}
            results["rows"].append(row)
            log(f"workers {count}: kdcli {kdcli_rate:,.0f}/s  png+PIL {naive_rate:,.0f}/s  x{row['ratio']:.2f}")
    h5 = _h5py_rate(plain_view, options.repeats)
    unaugmented = _rate(plain_view, options.batch_size, 0, options.repeats)
    results["plain_h5py"] = h5
    results["kdcli_no_augmentation"] = unaugmented
    results["fraction_of_h5py"] = unaugmented / h5
    log(f"no augmentation, 0 workers: kdcli {unaugmented:,.0f}/s vs plain h5py {h5:,.0f}/s "
        f"({100 * unaugmented / h5:.0f}%)")
    return results


@dataclass
class EngineBenchOptions:
    data: Path
    teacher: Path | None = None
    student: str = "fundus"
    model: str = "test_resnet"
    epochs: int = 3
    batch_size: int = 32
    rounds: int = 1  # engine and bare loop measured alternately this many times; medians reported
    threads: int = 0  # the engine's threads (0: kdcli's choice; the contention measurement compares it too)
    contention: bool = True  # also time teach with one busy process competing, kdcli's threads vs torch's default


def _bare_loop(view, model_spec: dict, epochs: int, batch_size: int, seed: int) -> float:
    """The naive way: the same model, data, sampler and optimizer in a plain PyTorch loop, no engine."""
    from kdcli.data.views import class_balanced_sampler, collate
    from kdcli.engine.device import seed_everything
    from kdcli.models.classifier import Classifier

    seed_everything(seed)
    model = Classifier(model_spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    seen, started = 0, time.perf_counter()
    for epoch in range(epochs):
        view.set_epoch(epoch)
        sampler = class_balanced_sampler(view.labels, len(view), seed * 1000 + epoch)
        for batch in DataLoader(view, batch_size=batch_size, sampler=sampler, drop_last=True,
                                collate_fn=collate):
            loss = torch.nn.functional.cross_entropy(model(batch["image"])["logits"], batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(batch["label"])
    return seen / (time.perf_counter() - started)


def bench_engine(options: EngineBenchOptions, log=print) -> dict[str, Any]:
    """Training samples/s (the engine's own per-epoch measurement, validation excluded) of `teach` against the
    bare loop, and of `distill` (teacher online, and with --cache-teacher) against `teach` when a teacher is
    given. The cache is built inside the shard directory on first use and reused afterwards."""
    import statistics

    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import ModalityView
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.engine.threads import choose_threads, torch_threads
    from kdcli.shards.reader import ShardStore
    from kdcli.train import distill, resolve_config, teach

    store = ShardStore(options.data)
    # one thread count for the engine and the bare loop alike: the overhead compares loops, not thread choices
    threads = choose_threads(options.threads, 0)
    common = {"data": str(options.data), "modality": options.student, "model": options.model, "workers": 0,
              "epochs": options.epochs, "batch_size": options.batch_size, "overwrite": True, "seed": 0,
              "threads": threads.threads}
    with tempfile.TemporaryDirectory(prefix="kdcli-bench-") as folder:
        # Skip epoch 1 (allocator and cache warm-up) in every measurement.
        rate = lambda result: statistics.fmean(r["train_samples_per_s"] for r in result.history[1:])  # noqa: E731
        # Alternating rounds: on a shared machine the speed drifts by more than the overhead being measured,
        # so each round times both ways back to back and the medians are compared.
        engine_rates, bare_rates = [], []
        size = store.meta.modalities[options.student]["shape"][0]
        view = ModalityView(store, "train", options.student, train_augmentation(size), seed=0)
        for _ in range(max(1, options.rounds)):
            taught = teach(resolve_config({**common, "out": f"{folder}/s.pt"}), log=lambda m: None)
            engine_rates.append(rate(taught))
            spec = load_checkpoint(Path(f"{folder}/s.pt")).meta["model"]
            with torch_threads(threads):
                _bare_loop(view, spec, 1, options.batch_size, 0)  # warm-up, as the engine's first epoch
                bare_rates.append(_bare_loop(view, spec, options.epochs - 1, options.batch_size, 0))
        engine_rate, bare_rate = statistics.median(engine_rates), statistics.median(bare_rates)
        # The overhead is taken within each round (the two ways ran back to back, under the same drift), then
        # the median over rounds; the ratio of the two medians is reported beside it.
        overheads = [1 - e / b for e, b in zip(engine_rates, bare_rates, strict=True)]
        results = {"threads": threads.threads, "engine": engine_rate, "bare_loop": bare_rate,
                   "engine_overhead": statistics.median(overheads),
                   "overhead_of_medians": 1 - engine_rate / bare_rate,
                   "rounds": {"engine": engine_rates, "bare_loop": bare_rates, "overhead": overheads}}
        per_round = ", ".join(f"{100 * o:.0f}%" for o in overheads)
        log(f"teach: engine {engine_rate:,.0f}/s vs bare loop {bare_rate:,.0f}/s (medians of {len(engine_rates)} "
            f"alternating rounds); overhead {100 * results['engine_overhead']:.1f}% (median per round: "
            f"{per_round}; {100 * results['overhead_of_medians']:.1f}% between the medians)")
        if options.teacher:
            distilled = distill(resolve_config({**common, "teacher": [str(options.teacher)], "method": "coda",
                                                "out": f"{folder}/d.pt"}), log=lambda m: None)
            results["distill"] = rate(distilled)
            results["distill_vs_student_only"] = engine_rate / results["distill"]
            cached = distill(resolve_config({**common, "teacher": [str(options.teacher)], "method": "coda",
                                             "cache_teacher": True, "out": f"{folder}/c.pt"}), log=lambda m: None)
            results["distill_cached"] = rate(cached)
            results["distill_cached_vs_student_only"] = engine_rate / results["distill_cached"]
            log(f"distill --method coda: {results['distill']:,.0f}/s with the teacher online "
                f"({results['distill_vs_student_only']:.2f}x the time of student-only training), "
                f"{results['distill_cached']:,.0f}/s with --cache-teacher "
                f"({results['distill_cached_vs_student_only']:.2f}x)")
        if options.contention:
            results["contention"] = bench_contention({**common, "threads": 0}, folder, options.threads, log)
    return results


def busy_process():
    """One competing CPU-bound process (a pure-Python spin, as another user's job would be)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_contention(common: dict[str, Any], folder: str, threads: int = 0, log=print) -> dict[str, Any]:
    """Wall time of the same teach idle and with one busy process competing, with kdcli's threads (chosen
    afresh each time, as every training run does; --threads fixes them) and with torch's default (one per CPU
    it may use: the naive way). The slowdowns are loaded / idle time of each."""
    from kdcli.engine.threads import allowed_cpus, choose_threads
    from kdcli.train import resolve_config, teach

    default = len(allowed_cpus())  # what torch starts with when OMP_NUM_THREADS is not set

    def timed(count: int) -> float:
        result = teach(resolve_config({**common, "threads": count, "out": f"{folder}/t.pt"}), log=lambda m: None)
        return result.seconds

    def measure(phase: str) -> dict[str, Any]:
        # kdcli's own choice, ignoring an OMP_NUM_THREADS set for the shell (the point is to measure the choice)
        choice = choose_threads(threads, 0, environ={})
        row = {"kdcli_threads": choice.threads, "kdcli_seconds": timed(choice.threads), "busy_elsewhere": choice.busy,
               "default_threads": default, "default_seconds": timed(default)}
        log(f"{phase}: kdcli {row['kdcli_seconds']:.1f}s with {choice.describe()}; torch's default "
            f"{row['default_seconds']:.1f}s with {default} threads")
        return row

    idle = measure("idle")
    spinner = busy_process()
    try:
        time.sleep(0.5)  # let the scheduler see it
        loaded = measure("one busy process")
    finally:
        spinner.kill()
        spinner.wait()
    result = {"idle": idle, "loaded": loaded, "cpus": default,
              "kdcli_slowdown": loaded["kdcli_seconds"] / idle["kdcli_seconds"],
              "default_slowdown": loaded["default_seconds"] / idle["default_seconds"],
              "kdcli_loaded_vs_best_idle": loaded["kdcli_seconds"] / min(idle["kdcli_seconds"],
                                                                          idle["default_seconds"])}
    log(f"under one competing busy process on {default} CPUs: kdcli's threads {result['kdcli_slowdown']:.2f}x its "
        f"idle time ({result['kdcli_loaded_vs_best_idle']:.2f}x the best idle), torch's default "
        f"{result['default_slowdown']:.2f}x"
        + (f" (the 'idle' runs already shared the CPUs: {idle['busy_elsewhere']:.1f} busy elsewhere)"
           if idle["busy_elsewhere"] >= 0.5 else ""))
    return result


@dataclass
class PrepareBenchOptions:
    raw: Path
    source: str = "multieye"
    size: int = 128
    workers: int = 0  # 0 = all cores
    scale: int = 10  # peak memory is also measured on a raw set this many times larger (phantoms)


def _naive_prepare(paths: list[Path], size: int) -> float:
    """The naive way: one process, PIL decode + resize, every image kept in memory, one np.save at the end."""
    from PIL import Image

    started = time.perf_counter()
    images = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "all.npy", np.stack(images))
    return len(paths) / (time.perf_counter() - started)


def _prepare_in_child(raw: Path, out: Path, source: str, size: int, workers: int) -> tuple[float, float]:
    """images/s and peak RSS (MiB) of `kdcli prepare` in a fresh process, so memory is its own."""
    import json
    import subprocess
    import sys

    code = (
        "import json, resource, sys, time\n"
        "from pathlib import Path\n"
        "from kdcli.prepare import PrepareOptions, prepare\n"
        "t = time.perf_counter()\n"
        f"r = prepare(PrepareOptions(source={source!r}, raw=Path({str(raw)!r}), out=Path({str(out)!r}), "
        f"size={size}, workers={workers}, shard_size=256))\n"
        "n = sum(sum(c.values()) for c in r.meta.counts.values())\n"
        "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(json.dumps([n / (time.perf_counter() - t), peak / 1024]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rate, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return rate, peak


def bench_prepare(options: PrepareBenchOptions, log=print) -> dict[str, Any]:
    """images/s of prepare with 1 and N workers vs a naive PIL loop; peak memory for 1x and `scale`x images."""
    from kdcli.sources import SOURCES
    from kdcli.synth import SYNTHS

    workers = options.workers or os.cpu_count() or 1
    scan = SOURCES.get(options.source)().scan(options.raw)
    paths = [Path(p) for record in scan.records for p in record.files.values()]
    results: dict[str, Any] = {"images": len(paths), "workers": workers}
    with tempfile.TemporaryDirectory(prefix="kdcli-bench-") as folder:
        results["naive_pil"] = _naive_prepare(paths, options.size)
        for count in (1, workers):
            rate, peak = _prepare_in_child(options.raw, Path(folder) / f"w{count}", options.source, options.size,
                                           count)
            results[f"prepare_{count}_workers"] = rate
            results[f"peak_mib_{count}_workers"] = peak
        parallel = results[f"prepare_{workers}_workers"]
        results["parallel_efficiency"] = parallel / (workers * results["prepare_1_workers"])
        log(f"{len(paths)} images: naive PIL loop {results['naive_pil']:,.0f}/s; prepare 1 worker "
            f"{results['prepare_1_workers']:,.0f}/s, {workers} workers {parallel:,.0f}/s "
            f"(efficiency {results['parallel_efficiency']:.2f})")
        if options.scale > 1 and options.source in SYNTHS:
            per_class = max(3, round(len(paths) / (len(scan.classes) or 1) / max(1, len(scan.modalities))))
            big = Path(folder) / "raw-big"
            SYNTHS.get(options.source)(big, per_class=per_class * options.scale, size=options.size, workers=workers)
            _, big_peak = _prepare_in_child(big, Path(folder) / "big", options.source, options.size, 1)
            results["peak_mib_scaled"] = big_peak
            results["peak_ratio"] = big_peak / results["peak_mib_1_workers"]
            log(f"peak memory, 1 worker: {results['peak_mib_1_workers']:.0f} MiB for 1x, {big_peak:.0f} MiB for "
                f"{options.scale}x the images (x{results['peak_ratio']:.2f})")
    return results
