"""Option aliases shared across commands (one flag, default display and help text each), and the training
options teach and distill both take, defined once in TRAINING_OPTIONS."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

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


# teach's and distill's common options, in their --help order: (alias, default). Flags left unset stay None
# (or False) so that a --config file or --set may give them; kdcli.train.resolve_config fills the rest.
TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "task": (Task, None), "out": (Out, None), "model": (Model, None), "head": (Head, None),
    "epochs": (Epochs, None), "batch_size": (BatchSize, None), "lr": (Lr, None), "seed": (Seed, None),
    "device": (Device, None), "config": (Config, None), "workers": (Workers, None), "resume": (Resume, False),
    "overwrite": (Overwrite, False), "pretrained": (Pretrained, None), "allow_partial": (AllowPartial, False),
    "threads": (Threads, None), "track": (TrackLog, None), "patience": (Patience, None),
    "balanced": (Balanced, None), "amp": (Amp, None), "compile": (Compile, None), "concepts": (Concepts, None),
    "concept_embeddings": (ConceptEmb, None), "concept_scale": (ConceptScale, None), "param": (Param, None),
    "extra": (Extra, None),
}


def with_training_options(function: Callable[..., None]) -> Callable[..., None]:
    """Give a training command the TRAINING_OPTIONS. In the signature typer reads they sit after the command's
    own positional-or-keyword parameters and before its keyword-only ones; the call passes them in the
    command's **options."""
    own = inspect.signature(function, eval_str=True).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in own):
        raise TypeError(f"{function.__name__} needs a **options parameter to receive the training options")
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=alias)
              for name, (alias, default) in TRAINING_OPTIONS.items()]
    leading = [p for p in own if p.kind is p.POSITIONAL_OR_KEYWORD]
    trailing = [p for p in own if p.kind is p.KEYWORD_ONLY]
    function.__signature__ = inspect.Signature([*leading, *shared, *trailing], return_annotation=None)
    return function
