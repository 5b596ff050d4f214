"""`kdcli bench distill DATASET`: does distillation beat the same student trained without a teacher, and by how
much, as the training set grows? Paired differences with t intervals over seeds, on phantoms written for it.

For each variant of the phantom ("shared": the generator's design; "independent": its control where the
modalities share only the label, when the generator offers `independent`), each training size of a log-spaced
grid and each seed, one cell trains, in order:
    the teacher(s), the baseline (the student's modality, architecture and head, no teacher), a label-smoothing
    baseline (`-p label_smoothing=0.1`, the same epochs and batches: soft targets without a teacher), and every
    distillation method of the dataset,
then evaluates each on the TEST split with `kdcli evaluate`'s library function. The row of a method is the
paired difference method - baseline over seeds: mean, t 95% interval (mean ± t_{0.975, n-1} · sd / √n; none
for one seed) and the number of seeds up and down.

Design decisions:
- Data: one phantom per (variant, size), drawn with `--data-seed`; the seeds repeat TRAINING on it (initial
  weights, batch order, augmentation, and the teacher's own training). The test set is fixed when the generator
  takes a test-size option (test_per_class / test_cases / test_slides), else it is each size's own 20% split
  (said in the notes). The interval is therefore over training randomness given the data; `--resample` draws
  new data per seed (synth seed = data seed + seed) so that it covers data draws too.
- Pairing: baseline and students of one cell read the same shards (the same content hash in their checkpoints)
  and are trained with the same seed, so kdcli gives them the same initial weights and the same batch order.
  Exceptions by the methods' design, said in the notes: CVI's stage 2 and the bidirectional student start from
  their teacher, so their baselines are chosen to match (CVI: stage 2 with the posterior and KL off, as the
  README's control; bidirectional: the WSI-only model, as the README's table).
- Teachers are trained once per cell (per seed): a method's gain should not hinge on one lucky teacher. Each
  row reports the teacher's own metric beside it (a weak teacher has nothing to transfer).
- Small sizes still train: every epoch draws at least the grid's `min_samples` training samples (the engine's
  samples_per_epoch), the same for every run of a cell.
- Options the phantom generators are gaining (`independent`, `label_noise`, test sizes) are passed only when the
  generator's signature takes them; otherwise the variant is skipped, or the fixed test set dropped, with a note.
  `--label-noise` given to a generator without it is refused: results without the noise asked for would mislead.
- Resumable: everything lives under OUT/runs/; a run whose result file records the same configuration, data and
  teachers is not retrained, an interrupted one resumes from its last epoch, so rerunning the command after an
  interruption (or with more seeds or sizes) only trains what is missing.

Unlabeled pool (`--unlabeled N[,M...]`, issue 15): for each N > 0 the cell's phantom is drawn again with the
generator's `unlabeled=N` (an option found by its signature, like `independent`; refused where the generator
lacks it). The generators draw the pool from a stream of its own, so the labelled cases, their splits and pixels
are the same at every N: checked on every run (a hash of the labelled manifest rows and their shards' digests),
a difference stops the benchmark. In each cell, N = 0 trains as above; for each N > 0 every method that learns
from unlabeled samples (`unlabeled = True` in its class; the others' row at N = 0 stands for every N, said in
the notes) trains once more on the N-pool phantom (`<method>+u<N>`), with the cell's teachers and initial
weights, and a same-pool self-training control (`self-train+u<N>`: the recipe's `self_train` method with the
BASELINE checkpoint as its teacher, the student's own modality labelling the pool). Teachers, baseline and the
label-smoothing control train once, on the N = 0 phantom (teach never sees unlabeled samples), and every run is
evaluated on that phantom's test split: a row at N > 0 is paired with the same baseline, seeds and test set as
the row at N = 0. Rows carry `unlabeled` (N) and, for a method at N > 0, `pool_delta_mean` / `pool_ci_low` /
`pool_ci_high`: the paired difference with vs without the pool (method at N - method at 0), and
`vs_self_train_mean` / `_ci_low` / `_ci_high`: method at N - self-train at N (what the teacher's modality adds
over the same pool labelled by the baseline). Budget: a run with
the pool draws the cell's labelled budget per epoch (its min_samples, else the labelled training set's size) PLUS
as many unlabeled samples (`distill --unlabeled-ratio` 1, the engine's default: half of each batch), so it sees
its labelled samples as often as the baseline does and the pool in addition; the self-training control has the
very same budget, so the gain of the pool over self-training is not one of steps. (Measured first with the
pool INSIDE the labelled budget, half of each batch unlabeled and no extra steps: at 16 eyes per class KD + 600
unlabeled eyes gained nothing, -1.3 points; the labelled half-exposure cost what the pool gave.)
0 is always on the axis (the comparison without the pool).

Outputs under --out: runs/ (phantom shards, checkpoints, per-run results), results.csv, results.json (rows +
metadata: metric, command line, grid, notes, kdcli version, seconds), gain.png (one panel per method and
metric: difference vs training size with 95% intervals, shared vs independent, one line per pool size).

Grids: the default grid is 4 log-spaced sizes x 5 seeds x both variants, test_resnet (brats: a plain-8 U-Net) at
32 px (cxr 64), 12-15 epochs of at least 256 samples. Measured CPU time of one seed of the shared variant, x 10
for the whole grid: multieye 150 s (-> 25 CPU-minutes), brats 172 s at 15 epochs (-> 24 at the 12 it uses),
cxr ~100 s (-> 18), camelyon ~130 s with its phantoms (-> 24 with the fixed test slides), fundus-grading 94 s
(-> 16): under 30 minutes on 2 cores, about half that with `--jobs 2` (OMP_NUM_THREADS=1); half of each while
the generators have no independent control. `--quick` (2 sizes x 2 seeds, 5 epochs of at least 256 samples)
takes one to two minutes. `--unlabeled` adds per pool size two runs per paired multieye or brats cell (the method
and self-training): `bench distill multieye --quick --unlabeled 0,200` trained 72 runs (24 with the pool) in 191
CPU-seconds.
The full grid on a GPU (5 sizes, 10 seeds, larger images and models), e.g.:
    kdcli bench distill multieye --sizes 8,16,32,64,128 --seeds 10 --epochs 40 --image-size 128 \\
        --model resnet18 --device cuda --workers 4 --jobs 4 --out bench-multieye
and likewise brats (`--sizes 8,16,32,64,128 --image-size 96 --model plain-16`), cxr (`--sizes 4,8,16,32,64
--image-size 128`), camelyon (`--sizes 30,60,120,240,480 --image-size 64`), fundus-grading (as multieye).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.errors import KdcliError, UsageError

VARIANTS = ("shared", "independent")
LABEL_SMOOTHING = "label-smoothing"  # the row name of the label-smoothing control
SELF_TRAIN = "self-train"  # the row name of the same-pool self-training control


# ------------------------------------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class Grid:
    sizes: tuple[int, ...]
    seeds: int
    epochs: int
    image_size: int
    model: str
    batch_size: int = 32
    lr: float = 3e-3
    min_samples: int = 0  # each epoch draws at least this many training samples (0: the training set's size)
    test_size: int = 0  # fixed test set size, passed as the recipe's test option when the generator takes it


@dataclass(frozen=True)
class Run:
    """One model of a cell: `teach` or `distill` with these flags beyond the grid's; `teachers` name other runs
    of the cell; `epochs` and `lr` scale the grid's (a fine-tuning stage trains half as long at a third)."""

    kind: str  # teach | distill
    flags: dict[str, Any] = field(default_factory=dict)
    teachers: tuple[str, ...] = ()
    epochs: float = 1.0
    lr: float = 1.0
    phantom: str = ""  # methods only: the phantom it needs (default: the recipe's first)


@dataclass(frozen=True)
class Metric:
    name: str  # as printed and in the rows
    path: tuple[str, ...]  # keys into evaluate's report["metrics"]
    baseline: str  # the run every method is compared against
    teacher: str  # the run whose value is reported beside (the teacher's quality)
    teacher_should_beat: bool = True  # False where the teacher is an earlier stage or the baseline itself


@dataclass(frozen=True)
class Recipe:
    synth: str  # kdcli.synth.SYNTHS name
    size_option: str  # the generator's training-size keyword
    test_option: str  # its fixed test-size keyword, once it has one
    synth_options: Callable[[Grid], dict[str, Any]]
    prepare: Callable[[Path, Path, dict, Grid, int], list[str]]  # (raw, shards, synth summary, grid, workers)
    runs: dict[str, Run]  # teachers and baselines, in training order
    methods: dict[str, Run]
    metrics: tuple[Metric, ...]
    default: Grid
    quick: Grid
    phantoms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    evaluate: dict[str, Any] = field(default_factory=dict)  # EvaluateOptions fields
    notes: tuple[str, ...] = ()
    # the method whose run, with the baseline as its teacher, is the same-pool self-training control ("": none)
    self_train: str = ""


# bumped when a recipe's prepare writes other shards from the same phantom (brats 2: with the generator's split,
# so that its extra test cases are the test split, and its unlabeled cases; camelyon 2: with the generator's split)
PREPARE_REVISIONS = {"brats": 2, "camelyon": 2}


def _plain_prepare(source: str, **source_options: Any):
    def run(raw: Path, shards: Path, summary: dict, grid: Grid, workers: int) -> list[str]:
        from kdcli.prepare import PrepareOptions, prepare

        done = prepare(PrepareOptions(source=source, raw=raw, out=shards, size=grid.image_size, overwrite=True,
                                      workers=max(1, workers), source_options=dict(source_options)))
        return list(done.notes)

    return run


def _prepare_fundus_grading(raw: Path, shards: Path, summary: dict, grid: Grid, workers: int) -> list[str]:
    from kdcli.prepare import PrepareOptions, prepare

    for task, info in summary["sets"].items():  # the DR set, then the AMD set appended: one dataset, two tasks
        # the phantom's own split: grader noise lives in its train split, the fixed test pool in test
        prepare(PrepareOptions(source="fundus-grading", raw=Path(info["labels"]).parent, out=shards,
                               size=grid.image_size, overwrite=True, append=task != "dr", workers=max(1, workers),
                               source_options={"labels": info["labels"], "task": task, "splits": info["splits"]}))
    return []


def _prepare_brats(raw: Path, shards: Path, summary: dict, grid: Grid, workers: int) -> list[str]:
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.brats import UNLABELED_DIR

    options: dict[str, Any] = {}
    if summary.get("splits_file"):  # the extra test cases (and noisy train labels) are fixed by this split
        options["splits"] = str(raw / summary["splits_file"])
    if (raw / UNLABELED_DIR).is_dir():  # the pool: cases without label files, as validation data ship
        options["unlabeled"] = str(raw / UNLABELED_DIR)
    done = prepare(PrepareOptions(source="brats", raw=raw, out=shards, size=grid.image_size, overwrite=True,
                                  workers=max(1, workers), source_options=options))
    return list(done.notes)


def _prepare_cxr(raw: Path, shards: Path, summary: dict, grid: Grid, workers: int) -> list[str]:
    from kdcli.prepare import PrepareOptions, prepare

    # EGD's sigma is 6% of the image width (150 px on ~2,500 px); the phantom is drawn at twice the stored size
    annotations = {"gaze": str(raw / "egd-cxr"), "boxes": str(raw / "BBox_List_2017.csv"),
                   "egd_sigma": 0.06 * 2 * grid.image_size}
    done = prepare(PrepareOptions(source="cxr", raw=raw, out=shards, size=grid.image_size, overwrite=True,
                                  workers=max(1, workers), source_options=annotations))
    return list(done.notes)


def _prepare_camelyon(raw: Path, shards: Path, summary: dict, grid: Grid, workers: int) -> list[str]:
    from kdcli.prepare import PrepareOptions, prepare

    # as `kdcli demo wsi`: up to 32 tissue patches per slide at 10x, 128 px, stored at the grid's image size; a
    # core too thin for one patch is skipped and reported
    options: dict[str, Any] = {"patch_size": 128, "max_patches": 32, "mag": 10, "skip_bad": True}
    if summary.get("splits_file"):  # the fixed test slides (and noisy train labels) are fixed by this split
        options["splits"] = str(raw / summary["splits_file"])
    done = prepare(PrepareOptions(source="camelyon", raw=raw, out=shards, size=grid.image_size, overwrite=True,
                                  workers=max(1, workers), source_options=options))
    return list(done.notes)


# MultiEYE: teacher, baseline and students share the concept head CoDA needs, at the demo's x10 similarity scale:
# at the released 1 these short runs underfit, and CoDA's gate (teacher better than student) never opened (measured:
# train_gate 0 in every epoch of every run, the student identical to its baseline)
_CONCEPT = {"head": "concept", "concept_scale": 10.0}
_STAGE2 = {"epochs": 0.5, "lr": 1 / 3}  # a stage that fine-tunes its teacher: half the epochs, a third of the lr

RECIPES: dict[str, Recipe] = {
    "multieye": Recipe(
        synth="multieye", size_option="per_class", test_option="test_per_class",
        synth_options=lambda grid: {"size": grid.image_size},
        prepare=_plain_prepare("multieye"),
        phantoms={"unpaired": {}, "paired": {"paired": True}},
        runs={"teacher": Run("teach", {"modality": "oct", **_CONCEPT}),
              "baseline": Run("teach", {"modality": "fundus", **_CONCEPT})},
        methods={"coda": Run("distill", {"modality": "fundus", "method": "coda", **_CONCEPT}, ("teacher",),
                             phantom="unpaired"),
                 "kd": Run("distill", {"modality": "fundus", "method": "kd", **_CONCEPT}, ("teacher",),
                           phantom="paired"),
                 # DKD's warm-up scaled to the grid's 15 epochs (the paper ramps over 20 of CIFAR's 240)
                 "dkd": Run("distill", {"modality": "fundus", "method": "dkd", **_CONCEPT,
                                        "params": {"warmup_epochs": 2}}, ("teacher",), phantom="paired")},
        metrics=(Metric("accuracy", ("accuracy",), "baseline", "teacher"),),
        default=Grid((8, 16, 32, 64), 5, 15, 32, "test_resnet", min_samples=256, test_size=50),
        quick=Grid((8, 16), 2, 5, 32, "test_resnet", min_samples=256, test_size=10),
        notes=("multieye: CoDA on the unpaired phantom (its design: class-matched OCT partners), Hinton KD on a "
               "--paired one (it needs the same eye in both modalities), DKD beside it; each phantom has its own "
               "teacher and baseline; the label-smoothing control runs on the unpaired one",),
        self_train="kd"),
    "brats": Recipe(
        synth="brats", size_option="cases", test_option="test_cases",
        synth_options=lambda grid: {"size": grid.image_size},
        prepare=_prepare_brats,
        runs={"teacher": Run("teach", {"modality": "t1,t1ce,t2,flair"}),
              "baseline": Run("teach", {"modality": "t1ce"})},
        methods={"protokd": Run("distill", {"modality": "t1ce", "method": "protokd"}, ("teacher",))},
        metrics=(Metric("dice_mean", ("dice_mean",), "baseline", "teacher"),),
        default=Grid((8, 16, 32, 64), 5, 12, 32, "plain-8", min_samples=256, test_size=24),
        quick=Grid((6, 12), 2, 5, 32, "plain-8-2", min_samples=256, test_size=6),
        self_train="protokd"),
    "cxr": Recipe(
        synth="cxr", size_option="per_class", test_option="test_per_class",
        synth_options=lambda grid: {"size": max(64, 2 * grid.image_size), "annotated_fraction": 0.2},
        prepare=_prepare_cxr,
        runs={"stage1": Run("teach", {"modality": "xray", "head": "linear", "output_stride": 8}),
              "control": Run("distill", {"modality": "xray", "method": "cvi",
                                         "params": {"posterior_weight": 0, "kl_weight": 0}}, ("stage1",), **_STAGE2)},
        methods={"cvi": Run("distill", {"modality": "xray", "method": "cvi"}, ("stage1",), **_STAGE2)},
        metrics=(Metric("mean_auroc", ("mean_auroc",), "control", "stage1", teacher_should_beat=False),),
        default=Grid((4, 8, 16, 32), 5, 12, 64, "test_resnet", min_samples=256, test_size=20),
        quick=Grid((4, 8), 2, 5, 32, "test_resnet", min_samples=256, test_size=4),
        notes=("cxr: the baseline is CVI's stage 2 with the posterior and KL terms off (the same epochs, frozen "
               "blocks, heads and initial weights: stage 1), as the README's control; the teacher is stage 1",)),
    "camelyon": Recipe(
        synth="camelyon", size_option="slides", test_option="test_slides",
        synth_options=lambda grid: {"size": 1536},
        prepare=_prepare_camelyon,
        runs={"fusion": Run("teach", {"modality": "wsi,clinical"}),
              "wsi": Run("teach", {"modality": "wsi"})},
        methods={"bidirectional": Run("distill", {"modality": "wsi", "method": "bidirectional"}, ("fusion",),
                                      **_STAGE2)},
        # the teacher's quality is its AUC with the records it was built for; with 80% withheld it is not a teacher
        metrics=(Metric("auc@0", ("0", "auc"), "wsi", "fusion"),
                 Metric("auc@0.8", ("0.8", "auc"), "wsi", "fusion", teacher_should_beat=False)),
        evaluate={"missing_rate": "0,0.8"},
        default=Grid((30, 60, 120, 240), 5, 15, 32, "test_resnet", batch_size=8, test_size=100),
        quick=Grid((16, 32), 2, 5, 32, "test_resnet", batch_size=8, test_size=16),
        notes=("camelyon: AUC with every clinical record present (auc@0) and with 80% withheld (auc@0.8), as the "
               "README's table; the bidirectional student starts from the fusion teacher (its design) and trains "
               "half the epochs at a third of the lr; the baseline is the WSI-only model from scratch",)),
    "fundus-grading": Recipe(
        synth="fundus-grading", size_option="amd_per_class", test_option="test_per_class",
        # drawn at twice the stored size, so that microaneurysm-sized lesions survive the downsampling; the DR set
        # stays large (48 eyes per grade) while the grid's size is the small AMD set's eyes per grade
        synth_options=lambda grid: {"size": 2 * grid.image_size, "per_class": 48},
        prepare=_prepare_fundus_grading,
        runs={"dr": Run("teach", {"task": "dr"}), "amd": Run("teach", {"task": "amd"})},
        methods={"sall": Run("distill", {"method": "sall"}, ("dr", "amd"))},
        metrics=(Metric("amd_accuracy", ("amd", "accuracy"), "amd", "amd", teacher_should_beat=False),
                 Metric("dr_accuracy", ("dr", "accuracy"), "dr", "dr", teacher_should_beat=False)),
        # min_samples above the largest training set: every run of a cell trains the same number of samples
        default=Grid((4, 8, 16, 32), 5, 15, 32, "test_resnet", min_samples=512, test_size=40),
        quick=Grid((4, 8), 2, 5, 32, "test_resnet", min_samples=512, test_size=8),
        notes=("fundus-grading: asymmetric sets: 48 DR eyes per grade at every size, the "
               "size is the AMD set's eyes per grade (75/25 train/dev; the fixed test pool is per grade and set); "
               "the single-task graders are both SALL's teachers and its baselines (AMD accuracy against the AMD "
               "grader, DR accuracy against the DR grader); independent: each set without the other disease",)),
}


# --------------------------------------------------------------------------------------------- statistics
def paired_interval(deltas: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the per-seed differences, its t interval mean ± t_{(1+c)/2, n-1} · sd / √n (sd with n - 1; None
    for one seed) and how many seeds went up (> 0) and down (< 0)."""
    from scipy import stats

    values = np.asarray(list(deltas), dtype=float)
    if values.size == 0:
        raise ValueError("no paired differences")
    mean = float(values.mean())
    low = high = None
    if values.size > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
        low, high = mean - half, mean + half
    return {"seeds": int(values.size), "delta_mean": mean, "ci_low": low, "ci_high": high,
            "seeds_up": int((values > 0).sum()), "seeds_down": int((values < 0).sum())}


# ----------------------------------------------------------------------------------------------- options
@dataclass
class DistillBenchOptions:
    dataset: str
    out: Path
    quick: bool = False
    sizes: tuple[int, ...] = ()  # empty: the grid's
    seeds: int = 0  # 0: the grid's
    epochs: int = 0
    model: str = ""
    image_size: int = 0
    methods: tuple[str, ...] = ()  # empty: all of the dataset's
    independent: bool = True  # also run the independent-modalities control
    label_smoothing: float = 0.1  # 0: no label-smoothing control
    label_noise: float | None = None  # passed to the generator (training labels flipped)
    unlabeled: tuple[int, ...] = ()  # unlabeled-pool sizes (the generator's `unlabeled`); 0 is always on the axis
    data_seed: int = 0
    resample: bool = False  # new data per seed
    device: str = "auto"
    workers: int = 0  # DataLoader workers; synth and prepare use max(1, workers) processes
    jobs: int = 1  # cells trained in parallel processes


def generator_options(function: Callable, wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options of `wanted` that `function` takes, and the names of those it does not."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(wanted), []
    return ({k: v for k, v in wanted.items() if k in parameters}, [k for k in wanted if k not in parameters])


def resolve_grid(recipe: Recipe, options: DistillBenchOptions) -> Grid:
    grid = recipe.quick if options.quick else recipe.default
    changes = {key: value for key, value in (("sizes", tuple(options.sizes)), ("seeds", options.seeds),
                                             ("epochs", options.epochs), ("model", options.model),
                                             ("image_size", options.image_size)) if value}
    grid = dataclasses.replace(grid, **changes)
    if any(size < 1 for size in grid.sizes) or len(set(grid.sizes)) != len(grid.sizes):
        raise UsageError(f"--sizes {','.join(map(str, grid.sizes))}: give distinct positive sizes")
    if grid.seeds < 1 or grid.epochs < 1:
        raise UsageError("--seeds and --epochs must be at least 1")
    return dataclasses.replace(grid, sizes=tuple(sorted(grid.sizes)))


def pool_sizes(options: DistillBenchOptions) -> list[int]:
    """The unlabeled-pool axis: 0 (no pool: the comparison every pool is read against), then the sizes asked for."""
    asked = tuple(options.unlabeled)
    if any(n < 0 for n in asked) or len(set(asked)) != len(asked):
        raise UsageError(f"--unlabeled {','.join(map(str, asked))}: give distinct pool sizes >= 0 (0: no pool)")
    return sorted({0, *asked})


def command_line(options: DistillBenchOptions, grid: Grid, methods: list[str]) -> str:
    """The command that reruns this benchmark with every grid value spelled out."""
    parts = ["kdcli", "bench", "distill", options.dataset, "--sizes", ",".join(map(str, grid.sizes)), "--seeds",
             str(grid.seeds), "--epochs", str(grid.epochs), "--model", grid.model, "--image-size",
             str(grid.image_size), "--methods", ",".join(methods), "--label-smoothing", f"{options.label_smoothing:g}",
             "--data-seed", str(options.data_seed), "--out", str(options.out)]
    parts += [] if options.independent else ["--no-independent"]
    parts += ["--resample"] if options.resample else []
    parts += [] if options.label_noise is None else ["--label-noise", f"{options.label_noise:g}"]
    parts += ["--unlabeled", ",".join(map(str, pools))] if len(pools := pool_sizes(options)) > 1 else []
    parts += [] if options.device == "auto" else ["--device", options.device]
    parts += [] if not options.quick else ["--quick"]
    return shlex.join(parts)


# -------------------------------------------------------------------------------------------------- jobs
@dataclass
class DataJob:
    label: str
    dataset: str
    folder: str
    synth_kwargs: dict[str, Any]
    grid: Grid
    workers: int


@dataclass
class RunJob:
    name: str
    kind: str
    flags: dict[str, Any]  # resolve_config flags, without data, out, teacher and seed
    teachers: list[str]
    data: str = ""  # shards it trains on when not the cell's (a phantom with an unlabeled pool); tested on the cell's
    unlabeled: int = 0  # the pool size of that phantom


@dataclass
class CellJob:
    label: str
    data: str
    folder: str
    seed: int
    runs: list[RunJob]
    metrics: dict[str, list[str]]  # name -> path into the report's metrics
    evaluate: dict[str, Any]
    device: str
    workers: int


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_data(job: DataJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Synth + prepare one phantom into job.folder/shards, unless an identical one is already there."""
    from kdcli.shards.format import atomic_write_json
    from kdcli.shards.reader import ShardStore
    from kdcli.synth import SYNTHS

    folder = Path(job.folder)
    key = {"dataset": job.dataset, "synth": job.synth_kwargs, "image_size": job.grid.image_size}
    if job.dataset in PREPARE_REVISIONS:  # phantoms prepared by an earlier recipe are rebuilt, not reused
        key["prepare_revision"] = PREPARE_REVISIONS[job.dataset]
    done = _read_json(folder / "data.json")
    if done and done.get("key") == key and (folder / "shards" / "dataset.json").is_file():
        log(f"{job.label} data: done earlier")
        if "labelled_hash" not in done:  # written before the unlabeled axis
            done["labelled_hash"] = labelled_hash(folder / "shards")
        return done
    for stale in (folder / "raw", folder / "shards"):  # a different or half-written phantom: start clean
        shutil.rmtree(stale, ignore_errors=True)
    recipe = RECIPES[job.dataset]
    started = time.perf_counter()
    try:
        summary = SYNTHS.get(recipe.synth)(folder / "raw", **job.synth_kwargs, workers=max(1, job.workers))
    except ValueError as exc:
        raise UsageError(f"synth {recipe.synth}: {exc}") from None
    notes = recipe.prepare(folder / "raw", folder / "shards", summary, job.grid, job.workers)
    shutil.rmtree(folder / "raw", ignore_errors=True)  # the shards are what the runs read; phantoms can be large
    meta = ShardStore(folder / "shards").meta
    result = {"key": key, "content_hash": meta.content_hash, "task": meta.task, "counts": meta.counts,
              "unlabeled": meta.unlabeled, "labelled_hash": labelled_hash(folder / "shards"), "notes": notes,
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(folder / "data.json", result)
    log(f"{job.label} data: synth {recipe.synth} {json.dumps(job.synth_kwargs)}, prepare ({result['seconds']:.0f}s)")
    return result


def labelled_hash(shards: Path) -> str:
    """A hash of the labelled samples alone: their manifest rows and the pixel digests of the shards that hold
    them (unlabeled samples live in shards of their own), so phantoms that differ only in their unlabeled pool
    hash alike, and any change to a labelled sample, its label or its split shows."""
    import hashlib

    import h5py
    import polars as pl

    from kdcli.shards.format import SHARD_DIR
    from kdcli.shards.reader import ShardStore

    rows = ShardStore(shards).manifest.filter(pl.col("labelled")).sort(["shard", "index"])
    hasher = hashlib.sha256()
    for shard in sorted(set(rows["shard"].to_list())):
        with h5py.File(Path(shards) / SHARD_DIR / shard, "r") as handle:
            hasher.update(f"{shard}={handle.attrs.get('digest', '')}\n".encode())
    for row in rows.iter_rows():
        hasher.update(("\t".join(map(str, row)) + "\n").encode())
    return "sha256:" + hasher.hexdigest()


def _metric_values(report: dict[str, Any], paths: dict[str, list[str]]) -> dict[str, float]:
    values = {}
    for name, path in paths.items():
        value: Any = report.get("metrics")
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[name] = float(value)
    return values


def train_cell(job: CellJob, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every run of one (variant, size, seed) cell in order, each skipped when its result is already there with
    the same configuration, data and teachers, resumed when it was interrupted."""
    from kdcli.engine.checkpoint import file_sha256, sibling
    from kdcli.evaluate.run import EvaluateOptions, evaluate
    from kdcli.shards.format import atomic_write_json
    from kdcli.shards.reader import ShardStore
    from kdcli.train import distill, resolve_config, teach

    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    hashes = {job.data: ShardStore(job.data).meta.content_hash}  # shards -> content hash
    results: dict[str, dict[str, Any]] = {}
    quiet = lambda message: None  # noqa: E731 - per-epoch lines would drown the benchmark's progress
    for run in job.runs:
        out = folder / f"{run.name}.pt"
        data = run.data or job.data
        if data not in hashes:
            hashes[data] = ShardStore(data).meta.content_hash
        teachers = [str(folder / f"{name}.pt") for name in run.teachers]
        key = {"kind": run.kind, "flags": run.flags, "seed": job.seed, "data": hashes[data],
               "teachers": [file_sha256(Path(path)) for path in teachers], "evaluate": job.evaluate}
        if run.data:  # trained on a pool's phantom, tested on the cell's
            key["test_data"] = hashes[job.data]
        result_path, key_path = sibling(out, ".bench.json"), sibling(out, ".bench-key.json")
        previous = _read_json(result_path)
        if previous and previous.get("key") == key and out.is_file():
            results[run.name] = {**previous, "cached": True, "unlabeled": run.unlabeled}
            log(f"{job.label} {run.name}: done earlier")
            continue
        resume = sibling(out, ".last.pt").is_file() and _read_json(key_path) == key
        if not resume:  # a .last.pt of another configuration must not be resumed if this run is interrupted early
            sibling(out, ".last.pt").unlink(missing_ok=True)
        atomic_write_json(key_path, key)  # what the .last.pt belongs to, so an interrupted run resumes
        flags = {**run.flags, "data": data, "out": str(out), "seed": job.seed, "device": job.device,
                 "workers": job.workers, "resume": resume, "overwrite": not resume,
                 **({"teacher": teachers} if teachers else {})}
        started = time.perf_counter()
        (teach if run.kind == "teach" else distill)(resolve_config(flags), log=quiet)
        # every run on the cell's test split: a run with a pool meets the very test set of its baseline
        report = evaluate(EvaluateOptions(out, Path(job.data), "test", device=job.device, **job.evaluate))
        values = _metric_values(report, job.metrics)
        result = {"key": key, "metrics": values, "seconds": round(time.perf_counter() - started, 2),
                  "content_hash": hashes[data]}
        atomic_write_json(result_path, result)
        results[run.name] = {**result, "cached": False, "unlabeled": run.unlabeled}
        shown = "  ".join(f"{k} {v:.3f}" for k, v in values.items())
        log(f"{job.label} {run.name}: {shown} ({result['seconds']:.1f}s{', resumed' if resume else ''})")
    return results


def _child_init(threads: int, parent: int) -> None:
    from kdcli.shards.writer import die_with_parent

    die_with_parent(parent)  # an interrupted benchmark's cells stop with it, not train on into its folders
    if "OMP_NUM_THREADS" not in os.environ:  # parallel cells share the cores instead of oversubscribing them
        import torch

        torch.set_num_threads(threads)


def _stderr_log(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _child_data(job: DataJob) -> dict[str, Any]:
    return build_data(job, _stderr_log)


def _child_cell(job: CellJob) -> dict[str, dict[str, Any]]:
    return train_cell(job, _stderr_log)


def _map(function: Callable, child: Callable, jobs: list, workers: int, log: Callable[[str], None]) -> list:
    """In this process for --jobs 1 (logs through `log`), else in `workers` spawned processes (fork after torch
    is loaded can deadlock its thread pools)."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(job, log) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_child_init, initargs=(threads, os.getpid())) as pool:
        return list(pool.map(child, jobs))


# ------------------------------------------------------------------------------------------------ the run
def _teach_method(task: str) -> str:
    from kdcli.tasks import TASKS

    return TASKS.get(task).supervised_method


def _accepts(method: str, parameter: str) -> bool:
    from kdcli.methods import METHODS

    return parameter in {f.name for f in dataclasses.fields(METHODS.get(method).Params)}


@dataclass
class Plan:
    recipe: Recipe
    grid: Grid
    methods: list[str]
    variants: list[str]
    phantoms: list[str]  # the recipe's
    used_phantoms: list[str]  # those the chosen methods need
    data_jobs: dict[tuple, DataJob]  # (variant, phantom, size, data seed or None) -> phantom to write
    notes: list[str]
    pools: list[int] = field(default_factory=lambda: [0])  # the unlabeled-pool axis, 0 first
    pooled: list[str] = field(default_factory=list)  # methods that train again with each pool > 0
    self_train: bool = False  # whether the same-pool self-training control runs
    pool_jobs: dict[tuple, DataJob] = field(default_factory=dict)  # (variant, phantom, size, data seed, N) -> phantom

    def phantom_of(self, method: str) -> str:
        return self.recipe.methods[method].phantom or self.phantoms[0]


def _learns_from_unlabeled(run: Run, name: str) -> bool:
    from kdcli.methods import METHODS

    return bool(METHODS.get(run.flags.get("method", name)).unlabeled)


def plan_benchmark(options: DistillBenchOptions) -> Plan:
    """Grid, variants and phantoms to write, from the options and what the generator takes today."""
    from kdcli.synth import SYNTHS

    if options.dataset not in RECIPES:
        raise UsageError(f"unknown dataset {options.dataset!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[options.dataset]
    grid = resolve_grid(recipe, options)
    methods = list(options.methods) or list(recipe.methods)
    unknown = [m for m in methods if m not in recipe.methods]
    if unknown:
        raise UsageError(f"--methods {','.join(unknown)}: {options.dataset} has {', '.join(recipe.methods)}")
    if not 0 <= options.label_smoothing < 1:
        raise UsageError(f"--label-smoothing {options.label_smoothing}: use 0 (off) or a value in (0, 1)")
    pools = pool_sizes(options)
    notes = list(recipe.notes)
    wanted = {"independent": True, recipe.test_option: grid.test_size}
    if options.label_noise is not None:
        wanted["label_noise"] = options.label_noise
    if len(pools) > 1:
        wanted["unlabeled"] = pools[-1]
    taken, missing = generator_options(SYNTHS.get(recipe.synth), wanted)
    if "label_noise" in missing:
        raise UsageError(f"--label-noise: the {recipe.synth} generator has no label_noise option yet")
    if "unlabeled" in missing:  # rows "with the pool" trained without one would mislead
        raise UsageError(f"--unlabeled: the {recipe.synth} generator has no unlabeled option yet")
    variants = ["shared"] + (["independent"] if options.independent else [])
    if "independent" in missing and "independent" in variants:
        variants.remove("independent")
        notes.append(f"independent control skipped: the {recipe.synth} generator has no independent option yet "
                     "('shared' is its current design)")
    if recipe.test_option in taken:
        notes.append(f"fixed test set: {recipe.test_option}={grid.test_size} at every size")
    else:
        notes.append(f"no fixed test set: the {recipe.synth} generator has no {recipe.test_option} option yet; "
                     "each size is tested on its own test split")
    if options.resample:
        notes.append("--resample: each seed draws its own phantom (synth seed = data seed + seed)")
    phantoms = list(recipe.phantoms)
    used = [p for p in phantoms if any((recipe.methods[m].phantom or phantoms[0]) == p for m in methods)]
    plan = Plan(recipe, grid, methods, variants, phantoms, used, {}, notes, pools)
    if len(pools) > 1:
        _plan_pools(plan)
    pool_phantoms = {plan.phantom_of(m) for m in plan.pooled}
    for variant in variants:
        for phantom in used:
            for size in grid.sizes:
                for seed in (range(grid.seeds) if options.resample else [None]):
                    synth_kwargs = {**recipe.synth_options(grid), **recipe.phantoms[phantom],
                                    recipe.size_option: size, "seed": options.data_seed + (seed or 0)}
                    if "independent" in taken:
                        synth_kwargs["independent"] = variant == "independent"
                    synth_kwargs |= {k: v for k, v in taken.items() if k in (recipe.test_option, "label_noise")}
                    label = (f"{variant}{'/' + phantom if len(phantoms) > 1 else ''} {recipe.size_option}={size}"
                             + ("" if seed is None else f" seed {seed}"))
                    folder = _cell_folder(Path(options.out), variant, phantom, size, seed, len(phantoms)) / "data"
                    plan.data_jobs[(variant, phantom, size, seed)] = DataJob(label, options.dataset, str(folder),
                                                                             synth_kwargs, grid, options.workers)
                    for pool in pools[1:] if phantom in pool_phantoms else []:
                        plan.pool_jobs[(variant, phantom, size, seed, pool)] = DataJob(
                            f"{label} unlabeled={pool}", options.dataset, str(folder.with_name(f"data-u{pool}")),
                            {**synth_kwargs, "unlabeled": pool}, grid, options.workers)
    return plan


def _plan_pools(plan: Plan) -> None:
    """Which methods train again with each pool, whether the self-training control runs, and notes on the rest."""
    recipe = plan.recipe
    plan.pooled = [m for m in plan.methods if _learns_from_unlabeled(recipe.methods[m], m)]
    for method in plan.methods:
        if method not in plan.pooled:
            plan.notes.append(f"{method} learns nothing from unlabeled samples (kdcli methods): no runs with a "
                              "pool; its unlabeled=0 row stands for every pool size")
    plan.self_train = recipe.self_train in plan.pooled
    if not plan.self_train:
        plan.notes.append(f"no same-pool self-training control: {recipe.self_train} is not among the methods run"
                          if recipe.self_train else
                          f"no same-pool self-training control for {recipe.synth}: no method of its recipe labels "
                          "the pool with the baseline")
    if plan.pooled:
        plan.notes.append(f"unlabeled pools {','.join(map(str, plan.pools[1:]))}: {', '.join(plan.pooled)}"
                          f"{' and ' + SELF_TRAIN if plan.self_train else ''} train again on each pool's phantom "
                          "(same labelled data, teachers, baseline, test set and labelled samples per epoch, plus "
                          "as many unlabeled ones: half of each batch)")


def plan_cells(plan: Plan, options: DistillBenchOptions, data: dict[tuple, dict]) -> dict[tuple, CellJob]:
    """(variant, phantom, size, seed) -> the runs of that cell, in training order: those on the phantom without
    a pool, then for each pool the methods that learn from it and the self-training control."""
    recipe, grid = plan.recipe, plan.grid
    cells: dict[tuple, CellJob] = {}
    skipped: set[str] = set()
    for (variant, phantom, size, data_seed), info in data.items():
        shards = Path(plan.data_jobs[(variant, phantom, size, data_seed)].folder) / "shards"
        samples = _samples_per_epoch(info["counts"], grid.min_samples)
        # a run with a pool draws what the others draw (min_samples, or one pass over the labelled training set)
        # plus as many unlabeled samples: the engine's ratio 1, half of each batch
        budget = 2 * (samples or max((c.get("train", 0) for c in info["counts"].values()), default=0))
        for seed in (range(grid.seeds) if data_seed is None else [data_seed]):
            runs = [_run_job(name, run, grid, samples) for name, run in recipe.runs.items()]
            if options.label_smoothing and phantom == plan.used_phantoms[0]:
                for name in sorted({metric.baseline for metric in recipe.metrics}):
                    base = recipe.runs[name]
                    trained_by = base.flags.get("method") or _teach_method(info["task"])
                    if base.kind != "teach" or not _accepts(trained_by, "label_smoothing"):
                        skipped.add(f"label-smoothing control skipped for {name}: {trained_by} has no "
                                    "label_smoothing parameter")
                        continue
                    smoothed = dataclasses.replace(base, flags={**base.flags, "params": {
                        **base.flags.get("params", {}), "label_smoothing": options.label_smoothing}})
                    runs.append(_run_job(f"{name}+ls", smoothed, grid, samples))
            runs += [_run_job(name, recipe.methods[name], grid, samples) for name in plan.methods
                     if plan.phantom_of(name) == phantom]
            for pool in plan.pools[1:]:
                pool_job = plan.pool_jobs.get((variant, phantom, size, data_seed, pool))
                if pool_job is None:  # no method on this phantom learns from a pool
                    continue
                pooled = str(Path(pool_job.folder) / "shards")
                runs += [_run_job(pooled_run(name, pool), recipe.methods[name], grid, budget, pooled, pool)
                         for name in plan.pooled if plan.phantom_of(name) == phantom]
                if plan.self_train and plan.phantom_of(recipe.self_train) == phantom:
                    # the baseline labels the pool through the student's own modality: no teacher's modality
                    control = dataclasses.replace(recipe.methods[recipe.self_train],
                                                  teachers=(recipe.metrics[0].baseline,))
                    runs.append(_run_job(pooled_run(SELF_TRAIN, pool), control, grid, budget, pooled, pool))
            folder = _cell_folder(Path(options.out), variant, phantom, size, None, len(plan.phantoms)) / f"seed{seed}"
            where = f"{variant}/{phantom}" if len(plan.phantoms) > 1 else variant
            label = f"{where} {recipe.size_option}={size} seed {seed}"
            cells[(variant, phantom, size, seed)] = CellJob(
                label, str(shards), str(folder), seed, runs, {m.name: list(m.path) for m in recipe.metrics},
                dict(recipe.evaluate), options.device, options.workers)
    plan.notes += sorted(skipped)
    return cells


def pooled_run(name: str, pool: int) -> str:
    """The cell's name of a run with an unlabeled pool of `pool` samples (its checkpoint: <name>+u<pool>.pt)."""
    return f"{name}+u{pool}"


def compared_rows(plan: Plan, options: DistillBenchOptions) -> list[Comparison]:
    """What the rows compare with the baseline, in table order: each method without, then with each pool; the
    self-training control per pool; the label-smoothing control."""
    compared = []
    for method in plan.methods:
        phantom = plan.phantom_of(method)
        compared.append(Comparison(method, phantom, method))
        if method in plan.pooled:
            compared += [Comparison(method, phantom, pooled_run(method, pool), pool, no_pool=method)
                         for pool in plan.pools[1:]]
    if plan.self_train:
        compared += [Comparison(SELF_TRAIN, plan.phantom_of(plan.recipe.self_train), pooled_run(SELF_TRAIN, pool),
                                pool, teacher_is_baseline=True) for pool in plan.pools[1:]]
    if options.label_smoothing:
        compared.append(Comparison(LABEL_SMOOTHING, plan.used_phantoms[0]))
    return compared


def check_labelled_alike(plan: Plan, data: dict[tuple, dict], pool_data: dict[tuple, dict]) -> None:
    """Every pool's phantom must hold the very labelled samples of the phantom without one; else a row "with
    the pool" would also differ in its labelled data and the pairing with the baseline would be broken."""
    for key, info in pool_data.items():
        if info["labelled_hash"] != data[key[:4]]["labelled_hash"]:
            job = plan.pool_jobs[key]
            raise KdcliError(f"the {plan.recipe.synth} generator's labelled samples change with unlabeled={key[4]} "
                             f"({job.label}): the pool would not be the only difference",
                             path=Path(job.folder) / "shards",
                             hint="a generator must draw its unlabeled pool from random streams of its own")


def bench_distill(options: DistillBenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from kdcli import __version__

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    plan = plan_benchmark(options)
    recipe, grid, out = plan.recipe, plan.grid, Path(options.out)
    pools = f", unlabeled pools {','.join(map(str, plan.pools))}" if len(plan.pools) > 1 else ""
    log(f"bench distill {options.dataset}: {len(plan.variants)} variant(s) x {len(grid.sizes)} sizes x "
        f"{grid.seeds} seeds{pools}, methods {', '.join(plan.methods)}; {grid.model}, {grid.image_size} px, "
        f"{grid.epochs} epochs")
    for note in plan.notes:
        log(f"note: {note}")
    data_jobs = [*plan.data_jobs.values(), *plan.pool_jobs.values()]
    built = _map(build_data, _child_data, data_jobs, options.jobs, log)
    data = dict(zip(plan.data_jobs, built[:len(plan.data_jobs)], strict=True))
    pool_data = dict(zip(plan.pool_jobs, built[len(plan.data_jobs):], strict=True))
    for job, info in zip(data_jobs, built, strict=True):
        plan.notes += [f"{job.label}: {note}" for note in info.get("notes") or []]
    check_labelled_alike(plan, data, pool_data)
    known = len(plan.notes)
    cells = plan_cells(plan, options, data)
    for note in plan.notes[known:]:
        log(f"note: {note}")
    cell_results = dict(zip(cells, _map(train_cell, _child_cell, list(cells.values()), options.jobs, log),
                            strict=True))

    known = len(plan.notes)
    rows = summarise_rows(recipe, compared_rows(plan, options), cell_results, plan.variants, grid, plan.notes)
    for note in plan.notes[known:]:
        log(f"note: {note}")
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    results = {
        "dataset": options.dataset, "metric": recipe.metrics[0].name, "metrics": [m.name for m in recipe.metrics],
        "size_option": recipe.size_option, "rows": rows, "notes": plan.notes,
        "command": command_line(options, grid, plan.methods), "grid": dataclasses.asdict(grid),
        "variants": plan.variants, "unlabeled": plan.pools, "kdcli_version": __version__,
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
        "runs": [{"variant": v, "phantom": p, "train_size": n, "seed": s, "run": name,
                  "unlabeled": r.get("unlabeled", 0), "metrics": r["metrics"], "seconds": r["seconds"],
                  "cached": r["cached"]}
                 for (v, p, n, s), cell in cell_results.items() for name, r in cell.items()],
        "data": {job.label: {"content_hash": info["content_hash"], "labelled_hash": info["labelled_hash"],
                             "counts": info["counts"], "unlabeled": info.get("unlabeled") or {},
                             "synth": job.synth_kwargs}
                 for job, info in zip(data_jobs, built, strict=True)},
    }
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = write_outputs(results, out)
    log(f"{len(results['runs'])} runs ({sum(not r['cached'] for r in results['runs'])} trained) in "
        f"{seconds:.0f}s wall, {cpu:.0f}s CPU; {out / 'results.json'}")
    return results


def _cpu_seconds() -> float:
    times = os.times()  # this process and its finished children (spawned cells, synth workers)
    return times.user + times.system + times.children_user + times.children_system


def _cell_folder(out: Path, variant: str, phantom: str, size: int, seed: int | None, phantom_count: int) -> Path:
    folder = out / "runs" / variant
    folder = folder / phantom if phantom_count > 1 else folder
    folder = folder / f"n{size}"
    return folder / f"seed{seed}" if seed is not None else folder


def _samples_per_epoch(counts: dict[str, dict[str, int]], minimum: int) -> int:
    """`minimum` when the training split is smaller (0 = the engine's default: the split's size)."""
    train = max((c.get("train", 0) for c in counts.values()), default=0)
    return minimum if minimum and train < minimum else 0


def _run_job(name: str, run: Run, grid: Grid, samples_per_epoch: int, data: str = "", unlabeled: int = 0) -> RunJob:
    flags = {"model": grid.model, "batch_size": grid.batch_size, "epochs": max(1, round(grid.epochs * run.epochs)),
             "lr": grid.lr * run.lr, "samples_per_epoch": samples_per_epoch, **run.flags}
    return RunJob(name, run.kind, flags, list(run.teachers), data, unlabeled)


# ------------------------------------------------------------------------------------------------ results
ROW_FIELDS = ("method", "variant", "train_size", "seeds", "baseline_mean", "student_mean", "delta_mean", "ci_low",
              "ci_high", "seeds_up", "seeds_down", "metric", "phantom", "teacher_mean", "deltas", "unlabeled",
              "pool_delta_mean", "pool_ci_low", "pool_ci_high", "vs_self_train_mean", "vs_self_train_ci_low",
              "vs_self_train_ci_high")


@dataclass(frozen=True)
class Comparison:
    """One family of rows: run `run` of each cell against the metric's baseline."""

    method: str  # the row's name
    phantom: str
    run: str = ""  # the cell's run ("": the method's own; the label-smoothing control: the baseline's +ls run)
    unlabeled: int = 0  # the pool it trained with
    no_pool: str = ""  # the same method's run without the pool: the rows also carry run - no_pool
    teacher_is_baseline: bool = False  # the self-training control: its teacher is the baseline


def summarise_rows(recipe: Recipe, compared: Sequence[Comparison | tuple[str, str]],
                   cells: dict[tuple, dict[str, dict]], variants: list[str], grid: Grid,
                   notes: list[str]) -> list[dict[str, Any]]:
    """One row per (metric, comparison, variant, size): the paired differences over the seeds where both the
    run and its baseline have the metric (an AUC is undefined on a one-class test split); rows of a run with a
    pool also carry the paired difference with the same method without it."""
    def value(cell: dict[str, dict], run: str, metric: str) -> float | None:
        return (cell.get(run) or {}).get("metrics", {}).get(metric)

    rows = []
    for metric in recipe.metrics:
        for comparison in (c if isinstance(c, Comparison) else Comparison(*c) for c in compared):
            method, phantom = comparison.method, comparison.phantom
            run = (f"{metric.baseline}+ls" if method == LABEL_SMOOTHING else comparison.run or method)
            teacher_run = metric.baseline if comparison.teacher_is_baseline else metric.teacher
            for variant in variants:
                for size in grid.sizes:
                    seeds = [cells[key] for key in sorted(k for k in cells if k[:3] == (variant, phantom, size))]
                    if not any(run in cell for cell in seeds):
                        continue  # a control not run for this baseline (its method has no label smoothing)
                    pairs = [(value(c, metric.baseline, metric.name), value(c, run, metric.name)) for c in seeds]
                    pairs = [(b, s) for b, s in pairs if b is not None and s is not None]
                    where = f"{method}{f' unlabeled={comparison.unlabeled}' if comparison.unlabeled else ''}"
                    if not pairs:
                        notes.append(f"{where} {variant} {recipe.size_option}={size}: {metric.name} undefined on "
                                     "every seed's test split")
                        continue
                    teacher = [t for c in seeds if (t := value(c, teacher_run, metric.name)) is not None]
                    deltas = [s - b for b, s in pairs]
                    stats = paired_interval(deltas)
                    row = {"method": method, "variant": variant, "train_size": size, "seeds": stats["seeds"],
                           "baseline_mean": float(np.mean([b for b, _ in pairs])),
                           "student_mean": float(np.mean([s for _, s in pairs])),
                           **{k: stats[k] for k in ("delta_mean", "ci_low", "ci_high", "seeds_up", "seeds_down")},
                           "metric": metric.name, "phantom": phantom,
                           "teacher_mean": float(np.mean(teacher)) if teacher else None, "deltas": deltas,
                           "unlabeled": comparison.unlabeled, "pool_delta_mean": None, "pool_ci_low": None,
                           "pool_ci_high": None, "vs_self_train_mean": None, "vs_self_train_ci_low": None,
                           "vs_self_train_ci_high": None}
                    gains = [w - wo for c in seeds if (w := value(c, run, metric.name)) is not None
                             and (wo := value(c, comparison.no_pool, metric.name)) is not None] \
                        if comparison.no_pool else []
                    if gains:
                        pool = paired_interval(gains)
                        row |= {"pool_delta_mean": pool["delta_mean"], "pool_ci_low": pool["ci_low"],
                                "pool_ci_high": pool["ci_high"]}
                    # what the teacher's modality adds over the same pool labelled by the baseline itself
                    control = pooled_run(SELF_TRAIN, comparison.unlabeled) if comparison.unlabeled else ""
                    over_self = [w - t for c in seeds if method != SELF_TRAIN and control
                                 and (w := value(c, run, metric.name)) is not None
                                 and (t := value(c, control, metric.name)) is not None]
                    if over_self:
                        versus = paired_interval(over_self)
                        row |= {"vs_self_train_mean": versus["delta_mean"], "vs_self_train_ci_low": versus["ci_low"],
                                "vs_self_train_ci_high": versus["ci_high"]}
                    rows.append(row)
                    if (metric.teacher_should_beat and teacher and method != LABEL_SMOOTHING
                            and not comparison.teacher_is_baseline and not comparison.unlabeled
                            and row["teacher_mean"] <= row["baseline_mean"]):
                        notes.append(f"weak teacher: {variant} {recipe.size_option}={size}: the teacher's "
                                     f"{metric.name} {row['teacher_mean']:.3f} is not above the baseline's "
                                     f"{row['baseline_mean']:.3f}; it has little to transfer")
    return rows


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, str]:
    from kdcli.shards.format import atomic_write_bytes, atomic_write_json

    files = {"json": str(out / "results.json"), "csv": str(out / "results.csv"), "png": str(out / "gain.png")}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ROW_FIELDS)
    for row in results["rows"]:
        writer.writerow(["" if row[k] is None else ";".join(f"{d:.6g}" for d in row[k]) if k == "deltas"
                         else f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in ROW_FIELDS])
    atomic_write_bytes(Path(files["csv"]), buffer.getvalue().encode())
    plot_gain(results, Path(files["png"]))
    atomic_write_json(Path(files["json"]), {**results, "files": files})
    return files


def plot_gain(results: dict[str, Any], path: Path) -> None:
    """One panel per (method, metric): mean difference vs training size (log axis), 95% t interval bars, one line
    per (variant, unlabeled pool): shared solid, independent dashed, a colour per pool size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    panels = list(dict.fromkeys((r["method"], r["metric"]) for r in rows)) or [("no rows", "")]
    columns = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(4.2 * columns,
                             3.3 * math.ceil(len(panels) / columns)), squeeze=False)
    sizes = sorted({r["train_size"] for r in rows})
    pools = sorted({r.get("unlabeled", 0) for r in rows})
    lines = [(variant, pool) for variant in VARIANTS for pool in pools]
    for ax, (method, metric) in zip(axes.flat, panels, strict=False):
        for offset, (variant, pool) in enumerate(lines):
            chosen = sorted((r for r in rows if (r["method"], r["metric"], r["variant"], r.get("unlabeled", 0))
                             == (method, metric, variant, pool)), key=lambda r: r["train_size"])
            if not chosen:
                continue
            x = np.array([r["train_size"] for r in chosen], dtype=float) * (1 + 0.05 * (offset - (len(lines) - 1) / 2))
            y = np.array([r["delta_mean"] for r in chosen])
            below = [0.0 if r["ci_low"] is None else r["delta_mean"] - r["ci_low"] for r in chosen]
            above = [0.0 if r["ci_high"] is None else r["ci_high"] - r["delta_mean"] for r in chosen]
            if len(pools) > 1:  # one colour per pool size, the variant by the line style
                style = {"label": f"{variant}, {pool} unlabeled", "color": f"C{pools.index(pool)}",
                         "ls": "-" if variant == "shared" else "--"}
            else:
                style = {"label": variant, "color": "C0" if variant == "shared" else "C1"}
            ax.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, **style)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        if sizes:
            ax.set_xscale("log")
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
            ax.legend(fontsize=7)
        ax.set_title(f"{method} - baseline" if method != "no rows" else method, fontsize=9)
        ax.set_xlabel(f"training size ({results['size_option']})", fontsize=8)
        ax.set_ylabel(f"delta {metric}", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{results['dataset']}: paired difference over seeds, 95% t interval", fontsize=10)
    fig.tight_layout()
    from kdcli.storage import save_figure

    save_figure(fig, path)


def render_table(results: dict[str, Any]):
    from rich.table import Table

    several = len(results["metrics"]) > 1
    pooled = any(r.get("unlabeled") for r in results["rows"])
    table = Table(title=f"bench distill {results['dataset']}: method - baseline, test {results['metric']}"
                        f"{' and others' if several else ''}, {results['seconds']:.0f}s", title_justify="left")
    columns = ["method", "variant", results["size_option"], *(["unlabeled"] if pooled else []), "teacher",
               "baseline", "student", "delta", "95% CI", "seeds +/-",
               *(["pool gain (95% CI)", "vs self-train (95% CI)"] if pooled else [])]
    for name in columns:
        table.add_column(name, justify="left" if name in ("method", "variant") else "right", no_wrap=True)
    number = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results["rows"]:
        interval = "-" if r["ci_low"] is None else f"{r['ci_low']:+.3f} {r['ci_high']:+.3f}"
        cells = [r["method"] + (f" {r['metric']}" if several else ""), r["variant"], str(r["train_size"])]
        cells += [str(r.get("unlabeled", 0))] if pooled else []
        cells += [number(r["teacher_mean"]), number(r["baseline_mean"]), number(r["student_mean"]),
                  f"{r['delta_mean']:+.3f}", interval, f"{r['seeds_up']}/{r['seeds_down']} of {r['seeds']}"]
        if pooled:
            for key in ("pool", "vs_self_train"):
                gain, low = r.get(f"{key}_delta_mean" if key == "pool" else f"{key}_mean"), r.get(f"{key}_ci_low")
                cells.append("-" if gain is None else f"{gain:+.3f}" if low is None
                             else f"{gain:+.3f} ({low:+.3f} {r[f'{key}_ci_high']:+.3f})")
        table.add_row(*cells)
    table.caption = ("delta: mean per-seed difference method - baseline (same data, seed and initial weights); "
                     "CI: mean ± t(0.975, n-1)·sd/√n"
                     + ("; unlabeled: the pool the run distilled on (self-train: the baseline is its teacher); "
                        "pool gain: the same method with the pool - without it, per seed; vs self-train: the "
                        "method with the pool - the baseline-taught run on the same pool" if pooled else ""))
    return table
