"""`kdcli teach`, `distill` and `embed`: training runs (their shared options are options.TRAINING_OPTIONS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.cli.common import chosen_threads, err, friendly_errors, parse_params, rank_zero_log
from kdcli.cli.options import Data, DataOpt, Device, OutputStride, Pretrained, Threads, with_training_options


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


@friendly_errors
@with_training_options
def teach(
    data: DataOpt = None, modality: Annotated[str | None, typer.Option(help="Modality to train on, e.g. oct.")] = None,
    *,  # options.TRAINING_OPTIONS come here in --help; the keyword-only ones below follow them
    output_stride: OutputStride = None,
    embeddings: Annotated[str | None, typer.Option(help="Slides: train on patch embeddings cached by `kdcli "
                                                        "embed` (the name it printed) instead of pixels.")] = None,
    **options: Any,
) -> None:
    """Train a model on one modality (the teacher, or a baseline).

    A first run on a CPU, in about a minute: kdcli synth multieye raw && kdcli prepare multieye raw --size 64 &&
    kdcli teach --modality oct --model test_resnet --lr 3e-3 (the demo's recipe). The defaults (resnet50 at the
    224 px prepare stores) are sized for a GPU."""
    flags = {"data": data, "modality": modality, **options, "output_stride": output_stride, "embeddings": embeddings}
    config = flags.pop("config")
    from kdcli.train import resolve_config
    from kdcli.train import teach as run_teach

    cfg = resolve_config(_train_flags(**flags), config)
    log = rank_zero_log()
    result = run_teach(cfg, log=log)
    _report_fit(result, Path(cfg.out), log)


@friendly_errors
@with_training_options
def distill(
    data: DataOpt = None,
    teacher: Annotated[list[Path] | None, typer.Option(help="Teacher checkpoint(s).")] = None,
    student: Annotated[str | None, typer.Option(help="The student's modality, e.g. fundus.")] = None,
    method: Annotated[str | None, typer.Option(help="Distillation method; `kdcli methods` lists them (default: "
                                                    "the one the data call for, printed).")] = None,
    *,  # options.TRAINING_OPTIONS come here in --help; the keyword-only ones below follow them
    cache_teacher: Annotated[bool, typer.Option(help="Run the teacher once over the un-augmented training "
                                                     "images and reuse its outputs (stored beside the shards).")]
    = False,
    unlabeled: Annotated[bool | None, typer.Option("--unlabeled/--no-unlabeled", help="Distil on the training set's "
                                                   "unlabeled samples too (methods that can; default on).")] = None,
    unlabeled_ratio: Annotated[float | None, typer.Option(help="Unlabeled samples drawn per labelled one "
                                                          "(default 1).")] = None,
    **options: Any,
) -> None:
    """Distil a teacher into a single-modality student."""
    flags = {"data": data, "teacher": teacher, "method": method, **options, "cache_teacher": cache_teacher or None,
             "unlabeled": unlabeled, "unlabeled_ratio": unlabeled_ratio}
    config = flags.pop("config")
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


@friendly_errors
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
