"""`kdcli demo [multieye|sall]`: a whole pipeline on small phantoms, ending with the comparison that matters,
over one or more seeds.

multieye: OCT teacher, fundus baseline (the student's architecture and head, no teacher) and the CoDA
          student, all evaluated on the same fundus test split.
sall:     single-task DR and AMD graders against one SALL model, each on its task's test split.
cxr:      stage-1 multi-label X-ray classifier and the CVI stage-2 model distilled from gaze on the annotated
          subset, mean AUROC on the test split.
wsi:      WSI-only MIL baseline, naive WSI + clinical model (missing records zero-filled) and the bidirectional
          model, AUC on the test slides as the share of missing clinical records grows.
brats:    4-sequence segmentation teacher, T1ce baseline and the ProtoKD T1ce student, Dice per tumour region
          on the test volumes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("accuracy", "macro_f1", "kappa", "auc")
ROLES = {  # role -> what it is
    "teacher (OCT)": "teach on OCT, evaluated on the OCT test split",
    "baseline (fundus)": "teach on fundus, same architecture and concept head as the student",
    "CoDA student (fundus)": "distill --method coda from the OCT teacher",
}


SALL_METRICS = ("dr_accuracy", "dr_kappa", "amd_accuracy", "amd_kappa")
SALL_ROLES = ("single-task DR", "single-task AMD", "SALL (both heads)")
WSI_RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
WSI_METRICS = tuple(f"auc@{r:g}" for r in WSI_RATES)
WSI_ROLES = ("WSI-only baseline", "naive WSI + clinical", "bidirectional")
CXR_METRICS = ("mean_auroc", "mean_ap", "gaze_nss", "gaze_auc", "box_iou")
CXR_ROLES = ("stage 1 (global labels)", "stage 2 without gaze (control)", "CVI stage 2 (+ gaze)")
BRATS_METRICS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")
BRATS_ROLES = ("teacher (t1+t1ce+t2+flair)", "baseline (t1ce)", "ProtoKD student (t1ce)")
# (distilled model, what it must beat): their per-seed differences are reported, seed by seed
COMPARISONS = {
    "multieye": (("CoDA student (fundus)", "baseline (fundus)"),),
    "sall": (("SALL (both heads)", "single-task DR"), ("SALL (both heads)", "single-task AMD")),
    "brats": (("ProtoKD student (t1ce)", "baseline (t1ce)"),),
    "wsi": (("bidirectional", "WSI-only baseline"),),
    "cxr": (("CVI stage 2 (+ gaze)", "stage 2 without gaze (control)"),),
}


@dataclass
class DemoOptions:
    out: Path
    seeds: int = 1
    epochs: int = 30
    per_class: int = 60
    size: int = 64
    pipeline: str = "multieye"
    model: str = ""  # default per pipeline: test_resnet (classification), plain-8 (brats U-Net)
    cases: int = 24  # brats: phantom cases (patients)
    annotated: float = 0.1  # cxr: fraction of images with gaze and boxes
    batch_size: int = 32
    lr: float = 3e-3
    workers: int = 0
    method_params: dict[str, str] | None = None  # -p overrides for the distillation method
    threads: int = 0  # torch threads of every model trained (0: each run chooses, kdcli.engine.threads)


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    if options.pipeline == "sall":
        return run_sall_demo(options, log)
    if options.pipeline == "brats":
        return run_brats_demo(options, log)
    if options.pipeline == "cxr":
        return run_cxr_demo(options, log)
    if options.pipeline == "wsi":
        return run_wsi_demo(options, log)
    options.model = options.model or "test_resnet"
    from kdcli.evaluate.run import EvaluateOptions, evaluate
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.multieye import synth_multieye
    from kdcli.train import distill, resolve_config, teach

    started = time.perf_counter()
    out = Path(options.out) / "multieye"
    raw, shards, checkpoints = out / "raw", out / "shards", out / "checkpoints"
    log(f"[1/4] synth multieye -> {raw}")
    synth_multieye(raw, per_class=options.per_class, size=options.size, seed=0)
    log(f"[2/4] prepare -> {shards}")
    prepare(PrepareOptions(source="multieye", raw=raw, out=shards, size=options.size, overwrite=True))
    # concept_scale 10, not the official 1: from scratch, a few hundred steps are too few for the concept
    # classifier to grow its weights on cosines in [-1, 1] (measured: the fundus baseline ends at train CE
    # 1.4-1.6 and test accuracy 0.46-0.53 at 1, against 0.6-0.7 and 0.60 at 10; the OCT teacher 0.95 either way).
    common = {"data": str(shards), "model": options.model, "epochs": options.epochs,
              "batch_size": options.batch_size, "lr": options.lr, "workers": options.workers,
              "head": "concept", "concept_scale": 10.0, "overwrite": True}
    common["threads"] = options.threads
    runs: dict[str, list[dict]] = {role: [] for role in ROLES}
    quiet = lambda message: None  # noqa: E731 - per-epoch lines would drown the demo's own progress
    for seed in range(options.seeds):
        log(f"[3/4] seed {seed}: teacher, baseline, student ({options.epochs} epochs each)")
        paths = {role: checkpoints / f"seed{seed}" / name for role, name in zip(
            ROLES, ("oct.pt", "fundus-baseline.pt", "fundus-coda.pt"), strict=True)}
        teach(resolve_config({**common, "seed": seed, "modality": "oct", "out": str(paths["teacher (OCT)"])}),
              log=quiet)
        teach(resolve_config({**common, "seed": seed, "modality": "fundus",
                              "out": str(paths["baseline (fundus)"])}), log=quiet)
        distill(resolve_config({**common, "seed": seed, "modality": "fundus", "method": "coda",
                                "teacher": [str(paths["teacher (OCT)"])], "params": options.method_params or {},
                                "out": str(paths["CoDA student (fundus)"])}), log=quiet)
        for role, path in paths.items():
            report = evaluate(EvaluateOptions(path, shards, "test"))
            runs[role].append({k: report["metrics"][k] for k in METRICS})
            log(f"      {role:<22} acc {report['metrics']['accuracy']:.3f}  "
                f"macro-F1 {report['metrics']['macro_f1']:.3f}")
    log("[4/4] summary")
    return _results(options, runs, METRICS, "MultiEYE phantoms, fundus/OCT test split", started, "multieye")


def run_sall_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from kdcli.evaluate.run import EvaluateOptions, evaluate
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.fundus_grading import synth_fundus_grading
    from kdcli.train import distill, resolve_config, teach

    options.model = options.model or "test_resnet"
    started = time.perf_counter()
    out = Path(options.out) / "sall"
    raw, shards, checkpoints = out / "raw", out / "shards", out / "checkpoints"
    log(f"[1/4] synth fundus-grading -> {raw}")
    # Drawn at twice the stored size, so that microaneurysm-sized lesions survive the downsampling prepare does.
    sets = synth_fundus_grading(raw, per_class=options.per_class, size=2 * options.size, seed=0)["sets"]
    log(f"[2/4] prepare dr + amd -> {shards}")
    for task, info in sets.items():
        prepare(PrepareOptions(source="fundus-grading", raw=Path(info["labels"]).parent, out=shards, size=options.size,
                               overwrite=True, append=task != "dr",
                               source_options={"labels": info["labels"], "task": task}))
    common = {"data": str(shards), "model": options.model, "epochs": options.epochs, "batch_size": options.batch_size,
              "lr": options.lr, "workers": options.workers, "overwrite": True}
    common["threads"] = options.threads
    runs: dict[str, list[dict]] = {role: [] for role in SALL_ROLES}
    quiet = lambda message: None  # noqa: E731
    for seed in range(options.seeds):
        log(f"[3/4] seed {seed}: DR teacher, AMD teacher, SALL ({options.epochs} epochs each)")
        paths = dict(zip(SALL_ROLES, (checkpoints / f"seed{seed}" / n for n in ("dr.pt", "amd.pt", "sall.pt")),
                         strict=True))
        for task, role in (("dr", "single-task DR"), ("amd", "single-task AMD")):
            teach(resolve_config({**common, "seed": seed, "task": task, "out": str(paths[role])}), log=quiet)
        distill(resolve_config({**common, "seed": seed, "method": "sall", "params": options.method_params or {},
                                "teacher": [str(paths["single-task DR"]), str(paths["single-task AMD"])],
                                "out": str(paths["SALL (both heads)"])}), log=quiet)
        for role, path in paths.items():
            metrics = evaluate(EvaluateOptions(path, shards, "test"))["metrics"]
            row = {f"{task}_{key}": metrics.get(task, {}).get(key) for task in ("dr", "amd")
                   for key in ("accuracy", "kappa")}
            runs[role].append(row)
            log(f"      {role:<18} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None))
    log("[4/4] summary")
    return _results(options, runs, SALL_METRICS, "graded fundus phantoms, per-task test splits", started, "sall")


def run_brats_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from kdcli.evaluate.volumes import evaluate_segmentation
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.brats import synth_brats
    from kdcli.train import distill, resolve_config, teach

    started = time.perf_counter()
    out = Path(options.out) / "brats"
    raw, shards, checkpoints = out / "raw", out / "shards", out / "checkpoints"
    log(f"[1/4] synth brats ({options.cases} cases) -> {raw}")
    synth_brats(raw, cases=options.cases, size=options.size, seed=0)
    log(f"[2/4] prepare -> {shards}")
    prepare(PrepareOptions(source="brats", raw=raw, out=shards, size=options.size, overwrite=True))
    common = {"data": str(shards), "model": options.model or "plain-8", "epochs": options.epochs,
              "batch_size": options.batch_size, "lr": options.lr, "workers": options.workers, "overwrite": True}
    common["threads"] = options.threads
    runs: dict[str, list[dict]] = {role: [] for role in BRATS_ROLES}
    quiet = lambda message: None  # noqa: E731
    for seed in range(options.seeds):
        log(f"[3/4] seed {seed}: teacher, t1ce baseline, ProtoKD student ({options.epochs} epochs each)")
        paths = dict(zip(BRATS_ROLES, (checkpoints / f"seed{seed}" / n for n in
                                       ("teacher.pt", "t1ce-baseline.pt", "t1ce-protokd.pt")), strict=True))
        teach(resolve_config({**common, "seed": seed, "modality": "t1,t1ce,t2,flair",
                              "out": str(paths[BRATS_ROLES[0]])}), log=quiet)
        teach(resolve_config({**common, "seed": seed, "modality": "t1ce", "out": str(paths[BRATS_ROLES[1]])}),
              log=quiet)
        distill(resolve_config({**common, "seed": seed, "modality": "t1ce", "method": "protokd",
                                "teacher": [str(paths[BRATS_ROLES[0]])], "params": options.method_params or {},
                                "out": str(paths[BRATS_ROLES[2]])}), log=quiet)
        for role, path in paths.items():
            metrics = evaluate_segmentation(path, shards, "test")["metrics"]
            runs[role].append({k: metrics[k] for k in BRATS_METRICS})
            log(f"      {role:<26} " + "  ".join(f"{k} {metrics[k]:.3f}" for k in BRATS_METRICS))
    log("[4/4] summary")
    return _results(options, runs, BRATS_METRICS, "BraTS phantoms, Dice on the test volumes", started, "brats")


def run_wsi_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from kdcli.evaluate.slides import evaluate_slides
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.camelyon import synth_camelyon
    from kdcli.train import distill, resolve_config, teach

    started = time.perf_counter()
    out = Path(options.out) / "wsi"
    raw, shards, checkpoints = out / "raw", out / "shards", out / "checkpoints"
    log(f"[1/4] synth camelyon ({options.cases} slides) -> {raw}")
    synth_camelyon(raw, slides=options.cases, size=1536, seed=0, workers=2)
    log(f"[2/4] prepare -> {shards}")
    # A thin core can hold no 128 px patch at 10x with half its area tissue (about 1 slide in 600): skipped and
    # reported, as a lab's prepare would, rather than failing the demo.
    prepared = prepare(PrepareOptions(source="camelyon", raw=raw, out=shards, size=options.size, overwrite=True,
                                      workers=2, source_options={"patch_size": 128, "max_patches": 32, "mag": 10,
                                                                 "skip_bad": True}))
    for note in prepared.notes:
        log(f"      note: {note}")
    common = {"data": str(shards), "model": options.model or "test_resnet", "epochs": options.epochs,
              "batch_size": 8, "lr": options.lr, "workers": options.workers, "overwrite": True}
    common["threads"] = options.threads
    runs: dict[str, list[dict]] = {role: [] for role in WSI_ROLES}
    quiet = lambda message: None  # noqa: E731
    rates = ",".join(f"{r:g}" for r in WSI_RATES)
    for seed in range(options.seeds):
        log(f"[3/4] seed {seed}: WSI-only, WSI + clinical, bidirectional ({options.epochs} epochs each)")
        paths = dict(zip(WSI_ROLES, (checkpoints / f"seed{seed}" / n for n in ("wsi.pt", "mm.pt", "bd.pt")),
                         strict=True))
        teach(resolve_config({**common, "seed": seed, "modality": "wsi", "out": str(paths[WSI_ROLES[0]])}),
              log=quiet)
        teach(resolve_config({**common, "seed": seed, "modality": "wsi,clinical", "out": str(paths[WSI_ROLES[1]])}),
              log=quiet)
        # the student starts from the fusion teacher: fine-tuning, at a third of the learning rate
        distill(resolve_config({**common, "seed": seed, "modality": "wsi", "method": "bidirectional",
                                "lr": options.lr / 3, "epochs": max(1, options.epochs // 2),
                                "teacher": [str(paths[WSI_ROLES[1]])], "params": options.method_params or {},
                                "out": str(paths[WSI_ROLES[2]])}), log=quiet)
        for role, path in paths.items():
            metrics = evaluate_slides(path, shards, "test", rates)["metrics"]
            runs[role].append({f"auc@{rate}": m["auc"] for rate, m in metrics.items()})
            log(f"      {role:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[role][-1].items()))
    log("[4/4] summary")
    return _results(options, runs, WSI_METRICS, "slide phantoms, test AUC by share of missing clinical records",
                    started, "wsi")


def run_cxr_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from kdcli.evaluate.run import EvaluateOptions, evaluate
    from kdcli.explain.gaze import gaze_agreement
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.cxr import synth_cxr
    from kdcli.train import distill, resolve_config, teach

    started = time.perf_counter()
    out = Path(options.out) / "cxr"
    raw, shards, checkpoints = out / "raw", out / "shards", out / "checkpoints"
    log(f"[1/4] synth cxr ({options.per_class} per finding, {options.annotated:.0%} with gaze) -> {raw}")
    synth_cxr(raw, per_class=options.per_class, size=2 * options.size, annotated_fraction=options.annotated,
              seed=0, workers=2)
    log(f"[2/4] prepare -> {shards}")
    # EGD's official sigma is 150 px on ~2500 px originals (6% of the width): the same share of the phantom's side
    prepare(PrepareOptions(source="cxr", raw=raw, out=shards, size=options.size, overwrite=True, workers=2,
                           source_options={"gaze": str(raw / "egd-cxr"), "boxes": str(raw / "BBox_List_2017.csv"),
                                           "egd_sigma": 0.06 * 2 * options.size}))
    common = {"data": str(shards), "model": options.model or "test_resnet", "batch_size": options.batch_size,
              "workers": options.workers, "overwrite": True, "modality": "xray", "head": "linear"}
    common["threads"] = options.threads
    # stride 8: an 8x8 feature map at 64 px, so gaze maps and CAMs have positions to agree on (stride 32: 2x2)
    runs: dict[str, list[dict]] = {role: [] for role in CXR_ROLES}
    quiet = lambda message: None  # noqa: E731
    for seed in range(options.seeds):
        log(f"[3/4] seed {seed}: stage 1 ({options.epochs} epochs), CVI ({options.epochs // 2} epochs)")
        paths = dict(zip(CXR_ROLES, (checkpoints / f"seed{seed}" / n for n in ("stage1.pt", "control.pt", "cvi.pt")),
                         strict=True))
        teach(resolve_config({**common, "seed": seed, "epochs": options.epochs, "lr": options.lr,
                              "output_stride": 8, "out": str(paths[CXR_ROLES[0]])}), log=quiet)
        # The control trains stage 2 exactly as CVI does (same epochs, frozen blocks, heads) but with the
        # posterior and KL terms off: what CVI gains over it comes from the gaze and boxes, not extra epochs.
        stage2 = {**common, "seed": seed, "epochs": max(1, options.epochs // 2), "lr": options.lr / 3,
                  "method": "cvi", "teacher": [str(paths[CXR_ROLES[0]])]}
        distill(resolve_config({**stage2, "params": {"posterior_weight": 0, "kl_weight": 0},
                                "out": str(paths[CXR_ROLES[1]])}), log=quiet)
        distill(resolve_config({**stage2, "params": options.method_params or {}, "out": str(paths[CXR_ROLES[2]])}),
                log=quiet)
        for role, path in paths.items():
            metrics = evaluate(EvaluateOptions(path, shards, "test"))["metrics"]
            # how well the Grad-CAMs agree with where radiologists looked (test images with gaze or boxes)
            agreement = gaze_agreement(path, shards, "test")["model"]
            row = {"mean_auroc": metrics["mean_auroc"], "mean_ap": metrics["mean_ap"],
                   "gaze_nss": agreement["nss"], "gaze_auc": agreement["auc"], "box_iou": agreement["iou"]}
            runs[role].append(row)
            log(f"      {role:<30} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None))
    log("[4/4] summary")
    return _results(options, runs, CXR_METRICS, "CXR phantoms, test split", started, "cxr")


def _results(options: DemoOptions, runs: dict[str, list[dict]], metrics: tuple[str, ...], title: str,
             started: float, pipeline: str) -> dict[str, Any]:
    return {"options": json_safe(vars(options)), "title": title, "metrics": list(metrics),
            "runs": runs, "summary": {role: summarise(values, metrics) for role, values in runs.items()},
            "paired": {f"{model} - {reference}": paired_differences(runs[model], runs[reference], metrics)
                       for model, reference in COMPARISONS[pipeline]},
            "seconds": round(time.perf_counter() - started, 1)}


def json_safe(value: Any) -> Any:
    """Options as JSON keeps their types (numbers stay numbers, None null); only paths become text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def paired_differences(model: list[dict], reference: list[dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """Seed-by-seed differences (both trained from the same seed, on the same split): their mean, standard
    deviation and standard error, and how many seeds went up and down. Metrics either side lacks are left out."""
    result = {}
    for metric in metrics:
        pairs = [(m[metric], r[metric]) for m, r in zip(model, reference, strict=True)
                 if m.get(metric) is not None and r.get(metric) is not None]
        if not pairs:
            continue
        differences = [m - r for m, r in pairs]
        sd = statistics.stdev(differences) if len(differences) > 1 else 0.0
        result[metric] = {"per_seed": differences, "mean": statistics.fmean(differences), "std": sd,
                          "se": sd / len(differences) ** 0.5, "up": sum(d > 0 for d in differences),
                          "down": sum(d < 0 for d in differences)}
    return result


def summarise(values: list[dict], metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, float | None]]:
    result = {}
    for metric in metrics:
        series = [v[metric] for v in values if v[metric] is not None]
        result[metric] = {
            "mean": statistics.fmean(series) if series else None,
            "std": statistics.stdev(series) if len(series) > 1 else 0.0,
            "min": min(series) if series else None,
            "max": max(series) if series else None,
        }
    return result


def render_table(results: dict[str, Any]):
    from rich.table import Table

    seeds = len(next(iter(results["runs"].values())))
    table = Table(title=f"{results['title']}, {seeds} seed(s), {results['seconds']:.0f}s")
    table.add_column("model")
    for metric in results["metrics"]:
        table.add_column(metric, justify="right")
    for role, stats in results["summary"].items():
        cells = []
        for metric in results["metrics"]:
            mean, std = stats[metric]["mean"], stats[metric]["std"]
            cells.append("-" if mean is None else f"{mean:.3f}" + (f" ± {std:.3f}" if seeds > 1 else ""))
        table.add_row(role, *cells)
    for name, differences in results.get("paired", {}).items():
        cells = []
        for metric in results["metrics"]:
            d = differences.get(metric)
            cells.append("" if d is None else f"{d['mean']:+.3f}" + (
                f" ± {d['se']:.3f} ({d['up']}↑ {d['down']}↓)" if seeds > 1 else ""))
        table.add_row(f"Δ {name}", *cells, style="dim")
    if seeds > 1 and results.get("paired"):
        table.caption = "Δ: per-seed difference, mean ± standard error, seeds up/down"
    return table
