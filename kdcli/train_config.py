"""The options of one training run (TrainConfig): read from flags and config files with typed checks, and the
checks every trainer shares (its --out, whether unlabeled samples take part). Every trainer (kdcli.train for
images, kdcli.segmentation, kdcli.mil) imports this; kdcli.train dispatches to the others, so what they share
lives here, not in train.py, which would make a circle."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.engine.loop import EngineConfig
from kdcli.errors import KdcliError, UsageError
from kdcli.shards.reader import ShardStore


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    modality: str = ""  # teach: the modality trained; distill: the student's modality
    task: str = ""  # datasets with several label spaces (fundus-grading): the one to train on
    teacher: list[str] = field(default_factory=list)
    method: str = "supervised"
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # timm name; distill defaults to the teacher's
    head: str = "auto"  # auto | linear | concept
    output_stride: int = 0  # 0: the model's own; 8 or 16 dilate the last stages (finer maps for CAMs and gaze)
    embeddings: str = ""  # slides: train MIL on patch embeddings cached by `kdcli embed` (their name)
    concepts: str = ""  # concept file (.npy or .txt); default: the dataset's bank
    concept_embeddings: str = ""  # (K, D) .npy, a text tower's (FLAIR's); default: fixed deterministic unit vectors
    concept_dim: int = 512
    concept_scale: float = 1.0  # fixed factor on the cosines before the concept classifier; 1 = the official
    pretrained: str = ""
    allow_partial: bool = False  # --pretrained may leave backbone tensors as initialised (else an error)
    augment: str = "light"
    resume: bool = False
    overwrite: bool = False
    cache_teacher: bool = False  # distill: read teacher outputs from <data>/cache (built on first use)
    unlabeled: bool = True  # distill: train the distillation terms on unlabeled samples too (methods that can)
    engine: EngineConfig = field(default_factory=EngineConfig)


ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}
TOP_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"engine"}


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KdcliError("config file not found", path=path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml and toml raise their own error types
        raise KdcliError(f"cannot parse config ({exc})".replace("\n", " "), path=path) from None
    if not isinstance(values, dict):
        raise KdcliError("config must be a mapping of option names to values", path=path)
    return values


def resolve_config(flags: dict[str, Any], config_file: Path | None = None) -> TrainConfig:
    """Defaults < config file < flags given on the command line (None means 'not given')."""
    merged: dict[str, Any] = {}
    from_file: set[str] = set()
    if config_file:
        file_values = read_config_file(config_file)
        file_values.update(file_values.pop("engine", {}) or {})
        file_values.pop("provenance", None)  # a run's <out>.config.json, reused as --config, records where it ran
        if "student" in file_values:  # distill's --student, as the file names it
            file_values.setdefault("modality", file_values.pop("student"))
        merged.update(file_values)
        from_file = set(file_values)
    for key, value in flags.items():
        if value is None:
            continue
        if key == "params" and isinstance(value, dict):
            merged["params"] = {**merged.get("params", {}), **value}
        else:
            merged[key] = value
    unknown = set(merged) - TOP_KEYS - ENGINE_KEYS
    if unknown:
        raise UsageError(f"unknown config key(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(TOP_KEYS | ENGINE_KEYS))}")
    engine_values = {k: v for k, v in merged.items() if k in ENGINE_KEYS}
    top_values = {k: v for k, v in merged.items() if k in TOP_KEYS}
    if isinstance(top_values.get("teacher"), str):
        top_values["teacher"] = [top_values["teacher"]]
    def where(key: str) -> str:  # a bad value is named with the file it came from
        return f" in {config_file}" if key in from_file and key not in flags_given else ""

    flags_given = {k for k, v in flags.items() if v is not None}
    coerced = {}
    for key, value in engine_values.items():
        default = EngineConfig.__dataclass_fields__[key].default
        try:
            coerced[key] = _coerce(value, default)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{key}: expected {type(default).__name__}, got {value!r}{where(key)}") from None
    try:
        engine = EngineConfig(**coerced)
    except UsageError as exc:
        key = str(exc).split("=", 1)[0]
        raise UsageError(f"{exc}{where(key)}") from None
    scalars = {f.name: f.default for f in dataclasses.fields(TrainConfig) if isinstance(f.default, (bool, int, float))}
    for key in set(top_values) & set(scalars):  # `--set concept_scale=10` and quoted config values arrive as text
        try:
            top_values[key] = _coerce(top_values[key], scalars[key])
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{key}: expected {type(scalars[key]).__name__}, got {top_values[key]!r}"
                             f"{where(key)}") from None
    return TrainConfig(**top_values, engine=engine)


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(value: Any, default: Any) -> Any:
    """A flag, config or --set value as the type of the field's default; ValueError when it is not one (a
    fractional epoch count or "maybe" for a switch is refused, not rounded or read as false)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in TRUE + FALSE:
            raise ValueError(value)
        return text in TRUE
    if isinstance(default, int):
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise ValueError(value)
        return int(number)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(value)
        return float(value)
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    values.update(values.pop("engine"))
    return values


def check_out(cfg: TrainConfig) -> Path:
    if not cfg.out:
        raise UsageError("--out is required (the checkpoint to write, e.g. oct.pt)")
    out = Path(cfg.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out}/model.pt")
    if out.exists() and not (cfg.resume or cfg.overwrite):
        raise KdcliError("checkpoint exists", path=out,
                         hint="pass --overwrite to train a new one in its place, or --resume to continue it")
    return out


def unlabeled_choice(cfg: TrainConfig, store: ShardStore, method_cls, log: Callable[[str], None],
                     modality: str | None = None, what: str = "samples", count: int | None = None) -> bool:
    """Whether the distillation terms see the training set's unlabeled samples; says why when they do not.
    `modality`: the key of dataset.json's counts (default cfg.modality; a segmentation student's first sequence,
    as its cfg.modality lists several); `what`: what a sample is (slices); `count`: the unlabeled units when
    they are not dataset.json's samples (slides, whose patches it counts), said without the modality."""
    modality = modality or cfg.modality
    units = f"{modality} {what}" if count is None else what
    if count is None:
        count = store.meta.unlabeled.get(modality, {}).get("train", 0)
    if not count:
        return False
    if not cfg.unlabeled:
        log(f"--no-unlabeled: {count} unlabeled {units} left out")
        return False
    if not method_cls.unlabeled:
        log(f"note: --method {cfg.method} does not learn from unlabeled {what}; {count} left out")
        return False
    log(f"{count} unlabeled {units}: distillation terms only, "
        f"{cfg.engine.unlabeled_ratio:g} per labelled {what.removesuffix('s')}")
    return True


def checkpoint_meta(cfg: TrainConfig, store: ShardStore, spec: dict[str, Any], kind: str, params: Any,
                    teacher: dict | list | None, **fields: Any) -> dict[str, Any]:
    """What every checkpoint records, whatever its task type; `fields` are the task's own (classes, size, ...)."""
    import time

    from kdcli import __version__
    from kdcli.sources.preprocessing import preprocessing_record

    return {
        "kdcli_version": __version__, "kind": kind, "task": store.meta.task, "model": spec,
        "modality": cfg.modality, **fields, "method": cfg.method, "method_params": dataclasses.asdict(params),
        "config": config_to_dict(cfg),
        "data": {"path": str(Path(cfg.data).resolve()), "source": store.meta.source,
                 "content_hash": store.meta.content_hash},
        "preprocess": preprocessing_record(store.meta),  # what `kdcli predict` repeats on raw files
        "teacher": teacher, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def teacher_record(path: str | Path, checkpoint: Any) -> dict[str, Any]:
    """How a student names its teacher: the file, its digest, and what it was trained on."""
    from kdcli.engine.checkpoint import file_sha256

    meta = checkpoint.meta
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path)), "modality": meta["modality"],
            "task": meta.get("label_task"), "backbone": meta["model"]["backbone"],
            "data_hash": meta["data"]["content_hash"]}
