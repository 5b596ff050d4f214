"""kdcli's command line. Thin on purpose: each command parses options, calls one library function and
prints. Heavy libraries (torch, timm, h5py) are imported inside the commands, so `--help` and shell
completion stay fast."""

from __future__ import annotations

import functools
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.cli_from_options import Compression, add_prepare_commands, add_synth_commands
from kdcli.errors import KdcliError, is_disk_full

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Distil a multi-modal teacher into a single-modality student, from raw data to "
                       "evaluated, explained models.")
synth_app = typer.Typer(no_args_is_help=True, help="Write phantom datasets in each dataset's real layout.")
prepare_app = typer.Typer(no_args_is_help=True, help="Turn a raw download into a shard directory.")
app.add_typer(synth_app, name="synth")
app.add_typer(prepare_app, name="prepare")
bench_app = typer.Typer(no_args_is_help=True, help="Measure kdcli against the naive way, in the same run.")
app.add_typer(bench_app, name="bench")


def err(message: str) -> None:
    typer.echo(message, err=True)


def system_error_line(exc: BaseException) -> str:
    """One line for an OS-level failure the library layers did not name already: the file when known, a full
    disk said as such, never a multi-line library message."""
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    if is_disk_full(exc):
        return f"{where}no space left on device — free some space, then rerun"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return where + text.splitlines()[0]


def show_version(value: bool) -> None:
    if value:
        from kdcli.provenance import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                               help="Print kdcli's version (and torch's, timm's) and exit.")]
         = False) -> None:
    """Distil a multi-modal teacher into a single-modality student, from raw data to evaluated, explained
    models."""


def chosen_threads(threads: int | None, workers: int = 0) -> Any:
    """A block run with --threads (or OMP_NUM_THREADS, or the free CPUs) torch threads."""
    from kdcli.engine.threads import choose_threads, torch_threads

    return torch_threads(choose_threads(threads or 0, workers))


def rank_zero_log() -> Any:
    """`err` on rank 0, silence on the others: under torchrun one line per run, not one per process."""
    import os

    return err if int(os.environ.get("RANK", "0")) == 0 else (lambda message: None)


def friendly_errors(function):
    """KdcliError and OS errors become one `error:` line and a non-zero exit, never a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except KdcliError as exc:
            err(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except (OSError, MemoryError) as exc:
            err(f"error: {system_error_line(exc)}")
            raise typer.Exit(1) from None
        except Exception as exc:  # a library's own error type around a full disk (polars, torch, h5py)
            if not is_disk_full(exc):
                raise
            err(f"error: {system_error_line(exc)}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err("interrupted; finished outputs are intact (rerun with --resume where offered)")
            raise typer.Exit(130) from None

    return wrapper


def command(typer_app: typer.Typer = app, name: str | None = None):
    return lambda function: typer_app.command(name)(friendly_errors(function))


def parse_params(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        params[key.strip()] = value.strip()
    return params


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr)


# ----------------------------------------------------------------------------------------------- synth
def run_synth(name: str, out: Path, **options: Any) -> dict:
    """The generators reject impossible sizes and counts with ValueError: show it as a usage error."""
    from kdcli.synth import SYNTHS

    try:
        return SYNTHS.get(name)(out, **options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# `synth <generator>`: generated from each generator's options dataclass (kdcli/synth/<name>.py)
add_synth_commands(synth_app, run_synth, friendly_errors, err)


# --------------------------------------------------------------------------------------------- prepare
def parse_part(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise typer.BadParameter(f"{value!r} is not I/N with 1 <= I <= N", param_hint="--part")
    return int(index), int(count)


def run_prepare(source: str, raw: Path, out: Path | None, size: int, workers: int, resume: bool, overwrite: bool,
                shard_size: int, compression: Compression, source_options: dict[str, Any],
                append: bool = False, part: str | None = None, allow_leakage: bool = False) -> None:
    from tqdm import tqdm

    from kdcli.defaults import default_prepare_out
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.shards.quality import lines as quality_lines

    out = out or default_prepare_out(source)
    options = PrepareOptions(source=source, raw=raw, out=out, size=size, workers=workers, resume=resume,
                             overwrite=overwrite, shard_size=shard_size,
                             compression=None if compression is Compression.none else compression.value,
                             source_options=source_options, append=append, part=parse_part(part),
                             allow_leakage=allow_leakage)
    bars: list = []

    def progress_factory(total: int):
        bar = tqdm(total=total, unit="img", desc=f"prepare {source}", file=sys.stderr, leave=False,
                   disable=None)  # None: silent when stderr is not a terminal (CI logs)
        bars.append(bar)
        return bar.update

    try:
        result = prepare(options, progress_factory)
    finally:
        for bar in bars:
            bar.close()
    for note in result.notes:
        err(f"note: {note}")
    for line in quality_lines(result.warnings):
        err(f"warning: {line}")
    if options.part:
        err(f"part {options.part[0]}/{options.part[1]} done ({result.written} shards written, {result.reused} "
            f"reused); when every part is done: kdcli prepare merge {out}")
        return
    counts = ", ".join(f"{m}: " + "/".join(str(c[s]) for s in ("train", "dev", "test"))
                       for m, c in result.meta.counts.items())
    err(f"prepared {out} ({counts} train/dev/test; {result.written} shards written, {result.reused} reused, "
        f"{result.seconds:.1f}s) {result.meta.content_hash[:19]}")


# `prepare <source>`: generated from each source's Options dataclass (kdcli/sources/<name>.py)
add_prepare_commands(prepare_app, run_prepare, friendly_errors)


@command(prepare_app, "merge")
def prepare_merge(
    out: Annotated[Path, typer.Argument(help="The --out every part was written for.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Join the parts of `prepare ... --part I/N` into one dataset (one manifest, one hash)."""
    from kdcli.prepare import merge_parts

    meta = merge_parts(out, overwrite)
    err(f"merged into {out} ({sum(sum(c.values()) for c in meta.counts.values())} samples) {meta.content_hash[:19]}")


# --------------------------------------------------------------------------------------------- inspect
@command()
def inspect(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verify: Annotated[bool, typer.Option(help="Re-hash every shard and compare with dataset.json.")] = False,
) -> None:
    """Counts per split, modality and class; shapes; content hash."""
    from kdcli.inspect import inspect_dataset

    report = inspect_dataset(data, verify=verify)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{data} — {report['source']}, {report['pairing']}, {report['samples']} samples")
    table.add_column("modality")
    table.add_column("shape")
    for split in ("train", "dev", "test"):
        table.add_column(split, justify="right")
    for modality, info in report["modalities"].items():
        per_split = report["per_class"].get(modality, {})
        table.add_row(modality, "x".join(map(str, info["shape"])),
                      *[str(report["counts"][modality].get(s, 0)) for s in ("train", "dev", "test")])
        names = report["label_names"] or [f"{t}:{c}" for t, info in report["tasks"].items()
                                          for c in info["classes"]]
        if modality in report["unlabeled"]:
            names = [*names, "unlabeled"]
        for name in names:
            table.add_row("", f"  {name}", *[str(per_split.get(s, {}).get(name, 0)) for s in ("train", "dev", "test")])
    out = console(stderr=False)
    out.print(table)
    out.print(f"hash {report['content_hash']}" + ("  (verified)" if verify else ""))
    from kdcli.shards.quality import lines as quality_lines

    for line in quality_lines(report["data_warnings"]):
        typer.echo(f"data warning: {line}")  # unwrapped: one line per kind, as prepare printed it


# ------------------------------------------------------------------------------------- teach / distill
Data = Annotated[Path, typer.Option("--data", "-d", help="Shard directory from `kdcli prepare`.")]
DataOpt = Annotated[Path | None, typer.Option("--data", "-d", help="Shard directory from `kdcli prepare` (default: "
                                              "the one under shards/; for a checkpoint or teacher, the dataset it "
                                              "was trained on).")]
Task = Annotated[str | None, typer.Option(help="Label space to train on, for datasets with several "
                                                "(fundus-grading: dr or amd).")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint to write (best); siblings: "
                                             ".last.pt, .metrics.csv/.jsonl, .config.json.")]
Model = Annotated[str | None, typer.Option(help="timm model name (distill: the teacher's). On a CPU start small: "
                                                "--model test_resnet with data prepared at --size 64.",
                                           show_default="resnet50; segmentation: the plain U-Net; distill: the "
                                                        "teacher's")]
Head = Annotated[str | None, typer.Option(help="auto | linear | concept (auto: concept when the data has "
                                                  "a concept bank).", show_default="auto")]
OutputStride = Annotated[int | None, typer.Option(help="Backbone output stride, 8 or 16: dilated last stages keep "
                                                       "finer feature maps (CAMs, gaze); default the model's.")]
# None = "not given" (a --config file or --set may set them), so typer cannot show the default itself: each
# show_default is the value the engine uses (kdcli.engine.loop.EngineConfig; tests/test_threads_and_logs.py
# checks they agree).
Epochs = Annotated[int | None, typer.Option(help="Epochs.", show_default="30")]
BatchSize = Annotated[int | None, typer.Option(help="Batch size (per process under torchrun).", show_default="32")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate, AdamW + warm-up + cosine.", show_default="0.001")]
Seed = Annotated[int | None, typer.Option(help="Seed (sampling, init, augmentation).", show_default="0")]
Device = Annotated[str | None, typer.Option(help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps.",
                                            show_default="auto")]
Config = Annotated[Path | None, typer.Option(help="YAML/TOML file of options (any of these, by their names with _ "
                                                 "for -, and engine keys such as ema; a run's .config.json works "
                                                 "too); flags override it.")]
Workers = Annotated[int | None, typer.Option(help="DataLoader worker processes.", show_default="2")]
Threads = Annotated[int | None, typer.Option(help="torch intra-op threads (0: the CPUs this process may use, less "
                                                  "--workers and CPUs busy elsewhere; OMP_NUM_THREADS is obeyed).",
                                             show_default="0")]
TrackLog = Annotated[list[str] | None, typer.Option("--log", metavar="KIND", help="Also send the per-epoch metrics to "
                                                    "tensorboard or mlflow: KIND, or KIND=DIR (tensorboard) / "
                                                    "KIND=URI (mlflow); each needs kdcli's extra of that name. "
                                                    "CSV/JSONL are always written.")]
Resume = Annotated[bool, typer.Option(help="Continue from <out>.last.pt.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing --out checkpoint.")]
Pretrained = Annotated[str | None, typer.Option(help="Backbone weights: a local .pth/.safetensors, or a timm name "
                                                    "(resnet18.a1_in1k) found in the local timm/Hugging Face cache; "
                                                    "nothing is downloaded.")]
AllowPartial = Annotated[bool, typer.Option(help="Let --pretrained leave backbone tensors the file lacks as "
                                                 "initialised (else a partial load is an error).")]
Param = Annotated[list[str] | None, typer.Option("--param", "-p", help="Method parameter KEY=VALUE "
                                                    "(repeatable); `kdcli methods` lists them.")]
Patience = Annotated[int | None, typer.Option(help="Early stop after N epochs without dev gain (0=off).",
                                              show_default="0")]
Balanced = Annotated[bool | None, typer.Option("--balanced/--no-balanced", help="Class-balanced sampling.",
                                               show_default="balanced")]
Amp = Annotated[str | None, typer.Option(help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16.",
                                         show_default="auto")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the student.",
                                              show_default="no-compile")]
Concepts = Annotated[str | None, typer.Option(help="Concept bank (.npy like concepts_raw.npy, or text).")]
ConceptEmb = Annotated[str | None, typer.Option(help="Concept embeddings (K, D) .npy, e.g. FLAIR's text tower's.")]
ConceptScale = Annotated[float | None, typer.Option(help="Fixed factor on the concept cosines before the concept "
                                                         "classifier (1 as the official code).", show_default="1.0")]
Extra = Annotated[list[str] | None, typer.Option("--set", help="Any other engine option KEY=VALUE, e.g. "
                                                    "ema=0.999, grad_clip=1, accumulate=2, weight_decay=0.05, "
                                                    "log_every=50 (batches between progress lines in a log file).")]


def _train_flags(**flags: Any) -> dict[str, Any]:
    extra = parse_params(flags.pop("extra")) or {}
    flags["params"] = parse_params(flags.pop("param"))
    for key in ("data", "out", "pretrained", "concepts", "concept_embeddings"):
        if flags.get(key) is not None:
            flags[key] = str(flags[key])
    flags["resume"] = flags["resume"] or None
    flags["overwrite"] = flags["overwrite"] or None
    flags["allow_partial"] = flags.pop("allow_partial") or None
    flags["log"] = ",".join(flags.pop("track")) if flags.get("track") else flags.pop("track", None)
    # a flag left unset must not erase the same key given with --set (`--set amp=bf16` was silently dropped)
    return {**extra, **{key: value for key, value in flags.items() if value is not None}}


def _report_fit(result, out: Path, log=err) -> None:
    log(f"best dev score {result.best_value:.4f} at epoch {result.best_epoch}; wrote {out} "
        f"({result.seconds:.0f}s)")


@command()
def teach(
    data: DataOpt = None, modality: Annotated[str | None, typer.Option(help="Modality to train on, e.g. oct.")] = None,
    task: Task = None, out: Out = None, model: Model = None, head: Head = None, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, seed: Seed = None, device: Device = None,
    config: Config = None, workers: Workers = None, resume: Resume = False, overwrite: Overwrite = False,
    pretrained: Pretrained = None, allow_partial: AllowPartial = False, threads: Threads = None,
    track: TrackLog = None,
    patience: Patience = None, balanced: Balanced = None, amp: Amp = None, compile: Compile = None,
    concepts: Concepts = None, concept_embeddings: ConceptEmb = None, concept_scale: ConceptScale = None,
    param: Param = None, extra: Extra = None,
    output_stride: OutputStride = None,
    embeddings: Annotated[str | None, typer.Option(help="Slides: train on patch embeddings cached by `kdcli "
                                                        "embed` (the name it printed) instead of pixels.")] = None,
) -> None:
    """Train a model on one modality (the teacher, or a baseline).

    A first run on a CPU, in about a minute: kdcli synth multieye raw && kdcli prepare multieye raw --size 64 &&
    kdcli teach --modality oct --model test_resnet --lr 3e-3 (the demo's recipe). The defaults (resnet50 at the
    224 px prepare stores) are sized for a GPU."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    from kdcli.train import resolve_config
    from kdcli.train import teach as run_teach

    cfg = resolve_config(_train_flags(**flags), config)
    log = rank_zero_log()
    result = run_teach(cfg, log=log)
    _report_fit(result, Path(cfg.out), log)


@command()
def distill(
    data: DataOpt = None,
    teacher: Annotated[list[Path] | None, typer.Option(help="Teacher checkpoint(s).")] = None,
    student: Annotated[str | None, typer.Option(help="The student's modality, e.g. fundus.")] = None,
    method: Annotated[str | None, typer.Option(help="Distillation method; `kdcli methods` lists them (default: "
                                                    "the one the data call for, printed).")] = None,
    task: Task = None, out: Out = None, model: Model = None, head: Head = None, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, seed: Seed = None, device: Device = None,
    config: Config = None, workers: Workers = None, resume: Resume = False, overwrite: Overwrite = False,
    pretrained: Pretrained = None, allow_partial: AllowPartial = False, threads: Threads = None,
    track: TrackLog = None,
    patience: Patience = None, balanced: Balanced = None, amp: Amp = None, compile: Compile = None,
    concepts: Concepts = None, concept_embeddings: ConceptEmb = None, concept_scale: ConceptScale = None,
    param: Param = None, extra: Extra = None,
    cache_teacher: Annotated[bool, typer.Option(help="Run the teacher once over the un-augmented training "
                                                     "images and reuse its outputs (stored beside the shards).")]
    = False,
    unlabeled: Annotated[bool | None, typer.Option("--unlabeled/--no-unlabeled", help="Distil on the training set's "
                                                   "unlabeled samples too (methods that can; default on).")] = None,
    unlabeled_ratio: Annotated[float | None, typer.Option(help="Unlabeled samples drawn per labelled one "
                                                          "(default 1).")] = None,
) -> None:
    """Distil a teacher into a single-modality student."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "student")}
    flags["cache_teacher"] = cache_teacher or None
    from kdcli.train import distill as run_distill
    from kdcli.train import resolve_config

    flags["modality"] = student
    flags["teacher"] = [str(t) for t in teacher] if teacher else None
    cfg = resolve_config(_train_flags(**flags), config)
    if cfg.method == "supervised":
        if method is not None:
            raise typer.BadParameter("choose a distillation method, e.g. --method coda", param_hint="--method")
        cfg.method = "auto"  # the one the data call for (kdcli.defaults.default_method)
    log = rank_zero_log()
    result = run_distill(cfg, log=log)
    _report_fit(result, Path(cfg.out), log)


@command()
def embed(
    data: Data,
    model: Annotated[str, typer.Option(help="timm encoder run over every patch.")] = "resnet18",
    pretrained: Pretrained = None,
    batch_size: Annotated[int, typer.Option(help="Patches per forward pass.")] = 256,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Slides: encode every patch once with a frozen encoder and store the features beside the shards
    (`<data>/embeddings/NAME.h5`); `teach --embeddings NAME` then trains MIL without re-running the encoder."""
    from kdcli.mil import embed_patches

    with chosen_threads(threads):
        result = embed_patches(data, model, pretrained, batch_size, device or "auto")
    verb = "reused" if result["reused"] else f"wrote {result['patches']} x {result['dim']} features to"
    err(f"{verb} {result['path']}")
    typer.echo(result["name"])


# ------------------------------------------------------------------------------------ evaluate/explain
@command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout; the table goes to stderr.")] = False,
    predictions: Annotated[Path | None, typer.Option(help="Per-sample ids, labels, probabilities (.csv or "
                                                        ".parquet); segmentation: a folder of NIfTI volumes.")]
    = None,
    figure: Annotated[Path | None, typer.Option(help="Confusion-matrix PNG (default beside the checkpoint).")] = None,
    missing: Annotated[str | None, typer.Option(help="Segmentation: evaluate with sequences left out (zero-"
                                                     "filled): `all` non-empty subsets, or e.g. t1ce+flair,t2.")]
    = None,
    missing_rate: Annotated[str | None, typer.Option(help="Slides: fractions of test patients whose clinical "
                                                          "record is withheld, e.g. 0,0.2,0.4,0.6,0.8.")] = None,
    bag_size: Annotated[int | None, typer.Option(help="Slides: patches per evaluation bag, the slide's score the "
                                                      "mean over its bags (default: the training bag size; 0: "
                                                      "every patch in one bag).")] = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Metrics of a checkpoint on a split: accuracy, macro-F1, kappa, AUC, AP, per-class F1; for segmentation
    Dice and HD95 of each tumour region per case (--predictions DIR writes NIfTI label volumes)."""
    from kdcli.evaluate.run import EvaluateOptions
    from kdcli.evaluate.run import evaluate as run_evaluate

    with chosen_threads(threads):
        report = run_evaluate(EvaluateOptions(checkpoint, data, split, predictions, figure, device or "auto",
                                              missing=missing, missing_rate=missing_rate, bag_size=bag_size))
    _print_metrics(report, to_stderr=as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def _print_metrics(report: dict, to_stderr: bool) -> None:
    from rich.table import Table

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    out = console(stderr=to_stderr)
    metrics = report["metrics"]
    if report.get("task") == "segmentation":
        _print_segmentation(report, out)
        return
    if report.get("task") == "mil":
        rows = metrics if "missing_rates" in report else {"0": metrics}
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
        for column in ("clinical missing", "AUC", "accuracy", "macro-F1", "slides"):
            table.add_column(column, justify="right")
        for rate, m in rows.items():
            table.add_row(rate, cell(m["auc"]), cell(m["accuracy"]), cell(m["macro_f1"]), str(m["n"]))
        out.print(table)
        return
    if "mean_auroc" in metrics:
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
        table.add_column("label")
        table.add_column("AUROC", justify="right")
        table.add_column("AP", justify="right")
        for name, auroc in metrics["per_label_auroc"].items():
            if auroc is not None:
                table.add_row(name, cell(auroc), cell(metrics["per_label_ap"][name]))
        table.add_row("mean", cell(metrics["mean_auroc"]), cell(metrics["mean_ap"]))
        out.print(table)
        return
    if report.get("tasks"):  # one row per label space (fundus-grading: dr, amd), each on its own rows
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
        table.add_column("task")
        for key in ("n", "accuracy", "macro_f1", "kappa", "auc"):
            table.add_column(key, justify="right")
        for task in report["tasks"]:
            m = metrics[task]
            table.add_row(task, str(m["n"]), *[cell(m[k]) for k in ("accuracy", "macro_f1", "kappa", "auc")])
        out.print(table)
        for task in report["tasks"]:
            out.print(f"{task} per-class F1: " + ", ".join(
                f"{name} {value:.2f}" for name, value in metrics[task]["per_class_f1"].items()))
        return
    keys = ("accuracy", "macro_f1", "kappa", "auc", "ap", "macro_precision", "macro_recall")
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*[cell(metrics[k]) for k in keys])
    out.print(table)
    out.print("per-class F1: " + ", ".join(f"{name} {value:.2f}" for name, value in metrics["per_class_f1"].items()))


def _print_segmentation(report: dict, out) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    regions = [k[5:] for k in metrics if k.startswith("dice_") and k != "dice_mean"]
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} ({report['cases']} cases)")
    table.add_column("")
    for region in regions:
        table.add_column(region.upper(), justify="right")
    table.add_column("mean", justify="right")
    table.add_row("Dice", *[f"{metrics[f'dice_{r}']:.4f}" for r in regions], f"{metrics['dice_mean']:.4f}")
    table.add_row("HD95 mm", *[f"{metrics[f'hd95_{r}']:.2f} ({metrics[f'hd95_{r}_undefined']} undef.)"
                               for r in regions], "")
    out.print(table)
    if report.get("missing"):
        sweep = Table(title="Dice with sequences missing (zero-filled)")
        sweep.add_column("present")
        for region in regions:
            sweep.add_column(region.upper(), justify="right")
        sweep.add_column("mean", justify="right")
        for row in report["missing"]:
            sweep.add_row("+".join(row["present"]), *[f"{row[f'dice_{r}']:.4f}" for r in regions],
                          f"{row['dice_mean']:.4f}")
        out.print(sweep)


@command()
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNGs and index.html.")] = Path("explain"),
    split: Annotated[str, typer.Option(help="Split to draw images from.")] = "test",
    count: Annotated[int, typer.Option("--count", "-n", help="Images to explain.")] = 12,
    top_concepts: Annotated[int, typer.Option(help="Concepts listed per image (concept models).")] = 5,
    device: Device = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier explain report at --out (its page, JSON and "
                                                 "images; your other files there stay).")] = False,
    threads: Threads = None,
) -> None:
    """Grad-CAM overlays (and top concepts for concept models) as PNGs plus an index.html."""
    from kdcli.explain.common import ExplainOptions
    from kdcli.explain.run import explain as run_explain

    with chosen_threads(threads):
        index = run_explain(ExplainOptions(checkpoint, data, out, split, count, top_concepts, device or "auto",
                                           overwrite=overwrite))
    err(f"wrote {index}")


@command()
def compare(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoints, folders of runs, or glob patterns (quoted): "
                                                          "runs differing only in the seed are one model.")],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Shard directory to evaluate every checkpoint on "
                                                                   "(default: each one's own dataset).")] = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    reference: Annotated[str | None, typer.Option(help="The model the others are compared with: its label or one "
                                                       "of its checkpoints (default: the first given).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired-bootstrap resamples of the test samples (0: none).")] = 2000,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write the table's numbers as CSV (long format).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write the table as an HTML page.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the whole report as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout; the table goes to stderr.")] = False,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """One table of metrics across models and seeds: mean ± sd per model, seed-paired differences from the
    reference, per-sample paired intervals where both answered the same test set, and warnings where a number
    means nothing (a model at chance, a one-seed difference)."""
    from kdcli.compare import CompareOptions, check_outputs, render_table, write_outputs
    from kdcli.compare import compare as run_compare

    check_outputs(csv, html, report)
    with chosen_threads(threads):
        result = run_compare(CompareOptions(checkpoints, data, split, device or "auto", reference, bootstrap), log=err)
    write_outputs(result, csv, html, report)
    from rich.console import Console

    # wide enough for the labels in a log file (rich assumes 80 columns when the stream is not a terminal)
    stream = sys.stderr if as_json else sys.stdout
    Console(stderr=as_json, width=None if stream.isatty() else 160).print(render_table(result))
    if as_json:
        typer.echo(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------- predict/export
@command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    inputs: Annotated[list[str], typer.Argument(help="Raw files, folders or glob patterns: fundus/OCT images, "
                                                     "X-rays (PNG/JPEG/DICOM), BraTS case folders or NIfTI "
                                                     "sequences, slides (OpenSlide formats, BCNB jpg).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Table of predictions: .csv, .parquet or .json. NIfTI "
                                                          "volumes, heat maps and overlays go to the folder named "
                                                          "after it (preds.csv -> preds/).")],
    explain: Annotated[bool, typer.Option(help="Also a Grad-CAM overlay PNG per image (segmentation: the labels "
                                               "on the slice with most tumour).")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first input that cannot be read; write nothing.")]
    = False,
    batch_size: Annotated[int, typer.Option(help="Images (slices) per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Processes decoding images (0: this one).")] = 0,
    threshold: Annotated[float, typer.Option(help="Multi-label: findings listed at or above this probability.")]
    = 0.5,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Only for checkpoints older than the "
                                              "preprocessing record: the shards they were trained on.")] = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Run a checkpoint on raw files, preprocessed exactly as `prepare` did for its data (size, CLAHE/median,
    DICOM windowing, brain z-score and crop, patches at the magnification).

    An unreadable input is one `failed` line and the rest go on; the exit status is then 1 (the table holds
    the others). --strict stops at the first one with nothing written."""
    from kdcli.predict.run import PredictOptions
    from kdcli.predict.run import predict as run_predict

    with chosen_threads(threads, workers):
        result = run_predict(PredictOptions(checkpoint, list(inputs), out, device or "auto", batch_size, workers,
                                            explain, strict, data, threshold), log=err)
    where = f" (files in {result.files})" if result.files else ""
    err(f"wrote {result.rows} prediction(s) to {result.out}{where}")
    if result.failures:
        err(f"error: {len(result.failures)} input(s) failed; see the lines above")
        raise typer.Exit(1)


class ExportFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


@command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (needs the onnx package: the "
                                                                          "`export` extra) or torchscript.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file (.onnx; .pt or .ts for TorchScript); the "
                                                          "contract goes beside it as <file>.json.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Only for checkpoints older than the "
                                              "preprocessing record: the shards they were trained on.")] = None,
) -> None:
    """Export a model for other runtimes, with its preprocessing contract (input size, dtype, channels, mean/std,
    the preprocessing steps, modality, classes) as JSON beside it."""
    from kdcli.export import ExportOptions, contract_path
    from kdcli.export import export as run_export

    contract = run_export(ExportOptions(checkpoint, format.value, out, overwrite, data))
    inputs = ", ".join(f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]" for i in contract["inputs"])
    err(f"wrote {out} ({inputs} -> {', '.join(contract['outputs'])}) and {contract_path(out)}")


# ------------------------------------------------------------------------------------------- helpers
@command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False) -> None:
    """List distillation methods and their parameters (the papers' defaults)."""
    from kdcli.methods import METHODS
    from kdcli.methods.base import params_table

    listing = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        listing[name] = {"help": METHODS.help(name), "tasks": list(cls.tasks), "terms": list(cls.terms),
                         "needs_teacher": cls.needs_teacher, "pairing": cls.pairing, "unlabeled": cls.unlabeled,
                         "params": {p: d for p, d, _ in params_table(cls.Params)}}
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    for name, info in listing.items():
        typer.echo(f"{name:<12} {info['help']}")
        typer.echo(f"{'':<14}tasks: {', '.join(info['tasks'])}; terms: {', '.join(info['terms'])}; unlabeled "
                   f"samples: {'distillation terms' if info['unlabeled'] else 'not used'}")
        for key, default in info["params"].items():
            typer.echo(f"{'':<14}-p {key}={default}")


@command(bench_app, "loader")
def bench_loader(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    modality: Annotated[str | None, typer.Option(help="Modality (default: the first).")] = None,
    split: Annotated[str, typer.Option(help="Split to read.")] = "train",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    workers: Annotated[list[int] | None, typer.Option(help="Worker counts to try (default 0, 1, all cores).")] = None,
    repeats: Annotated[int, typer.Option(help="Passes over the split per measurement.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Samples/s: kdcli's shard loader vs PNG files + PIL with the same augmentation, and vs plain h5py."""
    from kdcli.bench import LoaderBenchOptions
    from kdcli.bench import bench_loader as run_bench

    results = run_bench(LoaderBenchOptions(data, modality, split, batch_size, tuple(workers or ()), repeats), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@command(bench_app, "prepare")
def bench_prepare(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    source: Annotated[str, typer.Option(help="Dataset source.")] = "multieye",
    size: Annotated[int, typer.Option(help="Stored image side.")] = 128,
    workers: Annotated[int, typer.Option(help="N for the N-worker run (0 = all cores).")] = 0,
    scale: Annotated[int, typer.Option(help="Peak memory also on phantoms this many times larger (1 = skip).")]
    = 10,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """images/s of prepare with 1 and N workers vs a naive single-process PIL loop; peak memory for 1x and 10x."""
    from kdcli.bench import PrepareBenchOptions
    from kdcli.bench import bench_prepare as run_bench

    results = run_bench(PrepareBenchOptions(raw, source, size, workers, scale), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@command(bench_app, "engine")
def bench_engine(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    teacher: Annotated[Path | None, typer.Option(help="Also time distill --method coda with this teacher.")] = None,
    student: Annotated[str, typer.Option(help="Modality trained.")] = "fundus",
    model: Annotated[str, typer.Option(help="timm model.")] = "test_resnet",
    epochs: Annotated[int, typer.Option(help="Epochs per measurement (the first is warm-up).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    rounds: Annotated[int, typer.Option(help="Alternating engine/bare-loop rounds; medians are compared.")] = 3,
    threads: Threads = None,
    contention: Annotated[bool, typer.Option(help="Also time teach idle and with one busy process competing: "
                                                  "kdcli's threads vs torch's default.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Training samples/s: kdcli's engine vs a bare PyTorch loop; distillation vs student-only training; the
    slowdown under a competing CPU load with kdcli's thread choice and with torch's default."""
    from kdcli.bench import EngineBenchOptions
    from kdcli.bench import bench_engine as run_bench

    if epochs < 2:
        raise typer.BadParameter("at least 2 (the first is warm-up)", param_hint="--epochs")
    results = run_bench(EngineBenchOptions(data, teacher, student, model, epochs, batch_size, rounds, threads or 0,
                                           contention), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


def parse_list(text: str | None, name: str, kind: type = str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a comma-separated list", param_hint=name) from None


@command(bench_app, "distill")
def bench_distill(
    dataset: Annotated[str, typer.Argument(help="multieye, brats, cxr, camelyon or fundus-grading.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for runs/ (phantoms, checkpoints; reused "
                                                                 "when rerun) and the results (default: "
                                                                 "kdcli-bench/DATASET).")] = None,
    quick: Annotated[bool, typer.Option(help="CI scale: 2 sizes x 2 seeds, 5 epochs (minutes).")] = False,
    sizes: Annotated[str | None, typer.Option(help="Training sizes, comma-separated, in the generator's unit "
                                                   "(per class, cases or slides); default: the grid's.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 (0: the grid's, 5; --quick 2).")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs per model (0: the grid's).")] = 0,
    model: Annotated[str, typer.Option(help="Model for every run (default: test_resnet; brats: a plain U-Net).")]
    = "",
    image_size: Annotated[int, typer.Option(help="Stored image side (0: the grid's, 32 px; cxr 64).")] = 0,
    methods: Annotated[str | None, typer.Option(help="Methods to compare, comma-separated (default: all of the "
                                                     "dataset's).")] = None,
    independent: Annotated[bool, typer.Option(help="Also run the independent-modalities control (when the "
                                                   "generator has it).")] = True,
    label_smoothing: Annotated[float, typer.Option(help="Label-smoothing baseline's epsilon (0: no such "
                                                        "control).")] = 0.1,
    label_noise: Annotated[float | None, typer.Option(help="Share of training labels the generator flips (when it "
                                                           "has the option).")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="Unlabeled-pool sizes, comma-separated (e.g. 0,200): the "
                                                       "methods that learn from unlabeled samples train again with "
                                                       "each pool, beside a self-training control (the baseline as "
                                                       "teacher); teachers and baselines never see it.")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the phantoms.")] = 0,
    resample: Annotated[bool, typer.Option(help="Draw a new phantom per seed (the interval then covers data "
                                                "draws too).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers; synth and prepare processes.")] = 0,
    jobs: Annotated[int, typer.Option(help="Cells trained in parallel processes (2 on 2 cores with "
                                           "OMP_NUM_THREADS=1).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Distillation vs the same student without a teacher: paired differences over seeds and training sizes.

    Per (variant, size, seed): teacher, baseline, label-smoothing baseline and each method, on phantoms;
    with --unlabeled, each method that learns from unlabeled samples again per pool, and self-training.

    Writes results.csv, results.json and gain.png under --out; rerun to resume.

    Full grid on a GPU: kdcli bench distill multieye --sizes 8,16,32,64,128 --seeds 10 --epochs 40

    --image-size 128 --model resnet18 --device cuda --workers 4 --jobs 4"""
    from kdcli.bench_distill import DistillBenchOptions, render_table
    from kdcli.bench_distill import bench_distill as run_bench

    options = DistillBenchOptions(
        dataset, out or Path("kdcli-bench") / dataset, quick, parse_list(sizes, "--sizes", int), seeds, epochs,
        model, image_size, parse_list(methods, "--methods"), independent, label_smoothing, label_noise,
        parse_list(unlabeled, "--unlabeled", int), data_seed, resample, device, workers, jobs)
    results = run_bench(options, log=err)
    from rich.console import Console

    # wide enough for the table's columns in a log file (rich assumes 80 when stderr is not a terminal)
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(render_table(results))
    if as_json:
        typer.echo(json.dumps(results, indent=2))


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@command()
def completions(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script (the files in completions/ are this output)."""
    from kdcli.completion import completion_script

    typer.echo(completion_script(shell.value), nl=False)


class Pipeline(StrEnum):
    multieye = "multieye"
    sall = "sall"
    brats = "brats"
    cxr = "cxr"
    wsi = "wsi"


@command()
def demo(
    pipeline: Annotated[Pipeline, typer.Argument(help="multieye (OCT -> fundus, CoDA), sall (DR + AMD) or brats "
                                                      "(4 sequences -> T1ce, ProtoKD), cxr (gaze, CVI) or wsi "
                                                      "(slides + clinical, bidirectional).")]
    = Pipeline.multieye,
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder (phantoms, shards, checkpoints).")]
    = Path("kdcli-demo"),
    seeds: Annotated[int, typer.Option(help="Repeat training over this many seeds (mean ± spread).")] = 1,
    epochs: Annotated[int, typer.Option(help="Epochs per model.")] = 30,
    per_class: Annotated[int, typer.Option(help="Phantom images per class and modality.")] = 60,
    cases: Annotated[int, typer.Option(help="brats: phantom cases; wsi: slides.")] = 24,
    annotated: Annotated[float, typer.Option(help="cxr: fraction of images with gaze and boxes.")] = 0.1,
    size: Annotated[int, typer.Option(help="Image side.")] = 64,
    model: Annotated[str, typer.Option(help="Model for teacher and students (default: test_resnet; brats: the "
                                            "plain-8 U-Net).")] = "",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE for the "
                                                    "distillation method (coda or sall).")] = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON results on stdout.")] = False,
) -> None:
    """synth -> prepare -> teach -> distill -> evaluate on small phantoms, ending with a comparison table.

    multieye: OCT teacher, fundus baseline, CoDA fundus student. sall: single-task DR and AMD graders vs SALL."""
    from kdcli.demo import DemoOptions, render_table, run_demo

    with chosen_threads(threads):  # evaluation's; each training chooses its own unless --threads is given
        results = run_demo(DemoOptions(out, seeds, epochs, per_class, size, pipeline.value, model, cases=cases,
                                       annotated=annotated, method_params=parse_params(param), threads=threads or 0),
                           log=err)
    console(stderr=as_json).print(render_table(results))
    if as_json:
        typer.echo(json.dumps(results, indent=2))


def main() -> None:
    from kdcli.completion import enable_shell_completion

    enable_shell_completion()  # add_completion=False leaves Typer's shells unregistered; TAB needs them
    app(prog_name="kdcli")
