"""`kdcli compare A.pt B.pt ... [--data SHARDS]`: one table of test metrics across models and seeds.

Checkpoints (files, folders of runs, glob patterns) are grouped into models: runs whose configurations differ
only in the seed (and in paths, devices, threads) are seeds of one model. Each model gets mean ± sd over its
seeds; each other model its differences from the reference model (the first, or --reference):

- over seeds: the runs of the same seed paired (same split, same seed), the mean and sd of those differences and
  how many went up or down;
- per sample, where both models answered the same test set (the same ids): a paired bootstrap interval of the
  accuracy and macro-F1 differences (test samples resampled, seed pairs averaged) and McNemar's exact test on the
  samples one model got right and the other wrong (per seed pair; the largest p-value is shown).

The metrics are those `kdcli evaluate` reports (the same functions, on the same predictions). Warnings say when
a number means nothing: a model at chance, a difference from one seed, an interval that straddles 0."""

from __future__ import annotations

import glob
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.errors import KdcliError, UsageError
from kdcli.tasks import task_of

PER_RUN_KEYS = {"seed", "out", "data", "resume", "overwrite", "device", "workers", "threads", "log", "log_every",
                "teacher", "cache_teacher", "compile"}  # configuration that does not make another model
BOOTSTRAPPED = ("accuracy", "macro_f1")
CHANCE_KAPPA, CHANCE_AUC = 0.05, 0.6  # at or below both: no better than guessing the class frequencies


@dataclass
class CompareOptions:
    checkpoints: list[str]
    data: Path | None = None  # None: each checkpoint's recorded dataset
    split: str = "test"
    device: str = "auto"
    reference: str | None = None  # a model's label, or one of its checkpoints
    bootstrap: int = 2000
    seed: int = 0


@dataclass
class Run:
    path: Path
    seed: int
    label: str
    key: str  # what makes runs seeds of one model (model_key), made unique by split_duplicates
    metrics: dict[str, float | None]
    config: dict[str, Any] = field(default_factory=dict)  # the model's configuration, per-run keys left out
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # scope -> ids, labels, predictions, classes


def expand(inputs: list[str]) -> list[Path]:
    """Files as given, folders as every best checkpoint under them, glob patterns as their matches."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*.pt") if not p.name.endswith(".last.pt"))
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if not p.endswith(".last.pt"))
        else:
            matches = [path]
        if not matches:
            raise UsageError(f"{item}: no checkpoint found (give .pt files, folders of runs or glob patterns)")
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if len(unique) < 2:
        raise UsageError("compare needs at least two checkpoints")
    return unique


def _default_config() -> dict[str, Any]:
    from kdcli.train_config import TrainConfig, config_to_dict

    return config_to_dict(TrainConfig())


def model_key(meta: dict[str, Any]) -> str:
    # an option added after a run was trained is missing from its config: it ran with that option's default
    config = {**_default_config(), **(meta.get("config") or {})}
    config = {k: v for k, v in config.items() if k not in PER_RUN_KEYS}
    return json.dumps({"kind": meta.get("kind"), "modality": meta.get("modality"), "config": config},
                      sort_keys=True, default=str)


def model_label(meta: dict[str, Any]) -> str:
    config = meta.get("config") or {}
    backbone = (meta.get("model") or {}).get("backbone") or config.get("model") or ""
    task = meta.get("label_task")
    return " ".join(filter(None, [meta.get("method"), meta.get("modality"), task, backbone]))


def distinguish(runs: list[Run]) -> None:
    """Models sharing a label get the configuration keys in which they differ appended to it."""
    by_label: dict[str, dict[str, dict]] = {}
    for run in runs:
        by_label.setdefault(run.label, {})[run.key] = run.config
    for label, configs in by_label.items():
        if len(configs) < 2:
            continue
        keys = sorted({k for c in configs.values() for k in c if len({json.dumps(x.get(k), default=str)
                                                                        for x in configs.values()}) > 1})
        for run in runs:
            if run.label == label:
                config = configs[run.key]
                run.label = f"{label} ({', '.join(f'{k}={config.get(k)}' for k in keys)})"


def split_duplicates(runs: list[Run]) -> None:
    """Two runs of one model with the same seed are no seeds of one model (another dataset, say): each such
    model is split into one model per checkpoint folder, or per checkpoint."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    for members in groups.values():
        seeds = [run.seed for run in members]
        if len(seeds) == len(set(seeds)):
            continue
        folders = {run.path.parent for run in members}
        by_folder = len(folders) > 1 and all(len({r.seed for r in members if r.path.parent == f}) ==
                                             sum(r.path.parent == f for r in members) for f in folders)
        for run in members:
            where = run.path.parent.name if by_folder else run.path.name
            run.key, run.label = f"{run.key}|{where}", f"{run.label} [{where}]"


def evaluate_run(path: Path, options: CompareOptions) -> Run:
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.evaluate.run import label_tasks

    meta = load_checkpoint(path).meta
    data = options.data
    if data is None:
        from kdcli.defaults import recorded_dataset

        data = recorded_dataset(meta, path)
    seed = int((meta.get("config") or {}).get("seed", 0))
    run = Run(path, seed, model_label(meta), model_key(meta), {}, json.loads(model_key(meta))["config"])
    task = task_of(meta)
    if not task.compare_per_sample:
        run.metrics = _other_task_metrics(path, data, options, task.report_metrics)
        return run
    from kdcli.evaluate.run import run_model
    from kdcli.metrics.classification import classification_metrics

    tasks = label_tasks(meta)
    for scope in tasks or [None]:
        _, store, view, probs, labels, _ = run_model(path, data, options.split, options.device, task=scope)
        classes = store.meta.classes_for(scope)
        ordinal = bool(scope and store.meta.tasks[scope].get("ordinal"))
        metrics = classification_metrics(labels, probs, classes, ordinal=ordinal)
        prefix = f"{scope} " if scope else ""
        run.metrics.update({f"{prefix}{k}": metrics[k] for k in task.report_metrics})
        run.answers[scope or ""] = {"ids": list(view.ids), "labels": labels.astype(np.int64),
                                    "predictions": probs.argmax(1).astype(np.int64), "classes": len(classes),
                                    "data": str(data)}
    return run


def _other_task_metrics(path: Path, data: Path, options: CompareOptions,
                        names: tuple[str, ...]) -> dict[str, float | None]:
    """Multi-label, segmentation and slide checkpoints: evaluate's own report (no per-sample pairing here)."""
    from kdcli.evaluate.run import EvaluateOptions, evaluate

    report = evaluate(EvaluateOptions(path, data, options.split, device=options.device))
    return {name: report["metrics"].get(name) for name in names}


def summarise(values: list[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "sd": statistics.stdev(known) if len(known) > 1 else None, "n": len(known)}


def seed_differences(model: list[Run], reference: list[Run], metric: str) -> dict[str, Any] | None:
    theirs = {run.seed: run.metrics.get(metric) for run in reference}
    pairs = [(run.seed, run.metrics.get(metric), theirs.get(run.seed)) for run in model]
    differences = {seed: ours - ref for seed, ours, ref in pairs if ours is not None and ref is not None}
    if not differences:
        return None
    values = list(differences.values())
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"seeds": sorted(differences), "per_seed": [differences[s] for s in sorted(differences)],
            "mean": statistics.fmean(values), "sd": sd, "se": sd / math.sqrt(len(values)) if sd is not None else None,
            "up": sum(v > 0 for v in values), "down": sum(v < 0 for v in values)}


def macro_f1_weighted(weights: np.ndarray, labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 of each row of sample weights (a bootstrap resample's multiplicities), as scikit-learn computes
    it over every class with zero_division=0."""
    truth = np.eye(classes)[labels]
    guess = np.eye(classes)[predictions]
    tp = weights @ (truth * guess)
    fp = weights @ ((1 - truth) * guess)
    fn = weights @ (truth * (1 - guess))
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=1)


def sample_differences(model: list[Run], reference: list[Run], scope: str, resamples: int,
                       seed: int) -> dict[str, Any] | None:
    """Per-sample pairing of the seed-matched runs that answered the same test set (same ids in the same order):
    bootstrap intervals of the accuracy and macro-F1 differences and McNemar's exact test."""
    from scipy.stats import binomtest

    theirs = {run.seed: run.answers.get(scope) for run in reference}
    pairs = [(run.answers.get(scope), theirs.get(run.seed)) for run in model]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and a["ids"] == b["ids"]
             and np.array_equal(a["labels"], b["labels"])]
    if not pairs:
        return None
    n, classes = len(pairs[0][0]["ids"]), pairs[0][0]["classes"]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in BOOTSTRAPPED}
    chunk = max(1, min(resamples, 4_000_000 // max(1, n)))  # resamples per matrix product, memory bounded
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(count)]).astype(float)
        accuracy, f1 = np.zeros(count), np.zeros(count)
        for ours, ref in pairs:
            labels = ours["labels"]
            right = (ours["predictions"] == labels).astype(float) - (ref["predictions"] == labels).astype(float)
            accuracy += weights @ right / n
            f1 += (macro_f1_weighted(weights, labels, ours["predictions"], classes)
                   - macro_f1_weighted(weights, labels, ref["predictions"], classes))
        draws["accuracy"].append(accuracy / len(pairs))
        draws["macro_f1"].append(f1 / len(pairs))
    right = [(a["predictions"] == a["labels"], b["predictions"] == b["labels"]) for a, b in pairs]
    counts = [(int((mine & ~other).sum()), int((~mine & other).sum())) for mine, other in right]
    # McNemar's exact test per seed pair (pooling them would count each test image once per seed); the largest
    # p-value is the one reported: every seed pair has to show the difference
    p_values = [float(binomtest(ours, ours + theirs, 0.5).pvalue) if ours + theirs else 1.0 for ours, theirs in counts]
    result: dict[str, Any] = {"seed_pairs": len(pairs), "samples": n,
                              "right_only_model": sum(ours for ours, _ in counts),
                              "right_only_reference": sum(theirs for _, theirs in counts),
                              "mcnemar_p": max(p_values), "mcnemar_p_per_seed_pair": p_values}
    for name, values in draws.items():
        values = np.concatenate(values)
        result[name] = {"low": float(np.quantile(values, 0.025)), "high": float(np.quantile(values, 0.975))}
    return result


def at_chance(metrics: dict[str, float | None]) -> bool:
    """No better than guessing, in some label space: chance-level agreement (kappa) and ranking (AUC), or a
    multi-label model's mean AUROC near 0.5."""
    if metrics.get("mean_auroc") is not None:
        return metrics["mean_auroc"] <= CHANCE_AUC
    scopes = {name.rsplit(" ", 1)[0] if " " in name else "" for name in metrics}
    for scope in scopes:
        prefix = f"{scope} " if scope else ""
        kappa, auc = metrics.get(f"{prefix}kappa"), metrics.get(f"{prefix}auc")
        if kappa is None and auc is None:
            continue
        if (kappa is None or kappa <= CHANCE_KAPPA) and (auc is None or auc <= CHANCE_AUC):
            return True
    return False


def report_at_chance(report: dict[str, Any]) -> bool:
    """Whether an `evaluate` report's model is at chance by at_chance's rule; a report without kappa, AUC or mean
    AUROC (segmentation's Dice) has no such rule here, and a slide report per withheld-record rate is judged by
    compare, not here."""
    metrics = report.get("metrics") or {}
    if "missing_rates" in report:
        return False
    if report.get("tasks"):
        return at_chance({f"{task} {key}": metrics[task].get(key) for task in report["tasks"]
                          for key in ("kappa", "auc")})
    return at_chance({key: metrics.get(key) for key in ("kappa", "auc", "mean_auroc")})


def compare(options: CompareOptions, log=print) -> dict[str, Any]:
    if options.split not in ("train", "dev", "test"):
        raise UsageError(f"--split {options.split!r}: use train, dev or test")
    if options.bootstrap < 0:
        raise UsageError(f"--bootstrap {options.bootstrap}: 0 (no intervals) or a number of resamples")
    paths = expand(options.checkpoints)
    runs = []
    for path in paths:
        runs.append(evaluate_run(path, options))
        log(f"evaluated {path} ({', '.join(f'{k} {v:.3f}' for k, v in runs[-1].metrics.items() if v is not None)})")
    split_duplicates(runs)
    distinguish(runs)
    models: dict[str, list[Run]] = {}
    for run in runs:
        models.setdefault(run.label, []).append(run)
    labels = list(models)
    reference = _reference(options.reference, models, paths)
    metrics = list(dict.fromkeys(name for run in runs for name in run.metrics))
    report: dict[str, Any] = {"split": options.split, "data": str(options.data) if options.data else None,
                              "metrics": metrics, "reference": reference, "models": {}, "differences": {},
                              "warnings": []}
    for label in labels:
        members = sorted(models[label], key=lambda r: r.seed)
        report["models"][label] = {
            "runs": [{"checkpoint": str(r.path), "seed": r.seed, "metrics": r.metrics} for r in members],
            "summary": {m: summarise([r.metrics.get(m) for r in members]) for m in metrics}}
        for run in members:
            if at_chance(run.metrics):
                report["warnings"].append(f"{run.path}: at chance on {options.split} (kappa and AUC no better than "
                                          "guessing): its numbers, and any difference from it, mean nothing")
    for label in labels:
        if label == reference:
            continue
        name = f"{label} - {reference}"
        seeds = {m: seed_differences(models[label], models[reference], m) for m in metrics}
        scopes = list(dict.fromkeys(s for r in models[label] for s in r.answers))
        per_sample = {scope: sample_differences(models[label], models[reference], scope, options.bootstrap,
                                                options.seed) if options.bootstrap else None for scope in scopes}
        report["differences"][name] = {"seeds": seeds, "per_sample": per_sample}
        report["warnings"] += _difference_warnings(name, seeds, per_sample)
    for line in report["warnings"]:
        log(f"warning: {line}")
    return report


def _reference(wanted: str | None, models: dict[str, list[Run]], paths: list[Path]) -> str:
    if wanted is None:
        first = paths[0]
        return next(label for label, runs in models.items() if any(r.path == first for r in runs))
    if wanted in models:
        return wanted
    resolved = Path(wanted).resolve()
    for label, runs in models.items():
        if any(r.path == resolved for r in runs):
            return label
    raise UsageError(f"--reference {wanted!r}: not one of the models ({'; '.join(models)}) nor their checkpoints")


def _difference_warnings(name: str, seeds: dict[str, Any], per_sample: dict[str, Any]) -> list[str]:
    warnings = []
    counts = {len(d["seeds"]) for d in seeds.values() if d}
    if counts and max(counts) == 1:
        warnings.append(f"{name}: one seed each, so the difference is one draw of training noise, not a result; "
                        "train 3 or more seeds (--seed) of both")
    if not counts:
        warnings.append(f"{name}: no seed in common, so no paired difference; train the same seeds of both")
    for scope, result in per_sample.items():
        if result is None:
            continue
        interval = result["accuracy"]
        if interval["low"] <= 0 <= interval["high"]:
            where = f" ({scope})" if scope else ""
            warnings.append(f"{name}{where}: the accuracy difference's 95% interval over test samples "
                            f"[{interval['low']:+.3f}, {interval['high']:+.3f}] includes 0 (McNemar p = "
                            f"{result['mcnemar_p']:.2g}): not distinguishable on this test set")
    return warnings


# ------------------------------------------------------------------------------------------------ output
def _cell(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    sd = summary.get("sd")
    return f"{summary['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _difference_cell(difference: dict[str, Any] | None) -> str:
    if not difference:
        return "-"
    sd = difference.get("sd")
    return f"{difference['mean']:+.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + \
        f" ({difference['up']}↑ {difference['down']}↓)"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the one table: a row per model (mean ± sd over seeds), under each other model its
    differences from the reference (over seeds, then per sample)."""
    header = ["model", "seeds", *report["metrics"]]
    rows = []
    for label, model in report["models"].items():
        rows.append([label + (" (reference)" if label == report["reference"] else ""), str(len(model["runs"])),
                     *[_cell(model["summary"][m]) for m in report["metrics"]]])
        difference = report["differences"].get(f"{label} - {report['reference']}")
        if difference is None:
            continue
        count = max((len(d["seeds"]) for d in difference["seeds"].values() if d), default=0)
        rows.append(["  Δ vs reference", str(count),
                     *[_difference_cell(difference["seeds"][m]) for m in report["metrics"]]])
        for scope, result in difference["per_sample"].items():
            if result:
                prefix = f"{scope} " if scope else ""
                rows.append([f"  per sample{' ' + scope if scope else ''} (McNemar p {result['mcnemar_p']:.2g})",
                             f"{result['seed_pairs']}",
                             *[_interval_cell(result, m.removeprefix(prefix)) if m.startswith(prefix) else ""
                               for m in report["metrics"]]])
    return header, rows


def _interval_cell(result: dict[str, Any], metric: str) -> str:
    if metric not in BOOTSTRAPPED:
        return ""
    interval = result[metric]
    return f"[{interval['low']:+.3f}, {interval['high']:+.3f}]"


CAPTION = ("mean ± sd over seeds; Δ: seed-paired differences from the reference (seeds up/down); per sample: 95% "
           "paired-bootstrap interval over test samples, McNemar's exact p (the largest over seed pairs)")


def render_table(report: dict[str, Any]):
    from rich.markup import escape
    from rich.table import Table

    header, rows = table_rows(report)
    rows = [[escape(cell) for cell in row] for row in rows]  # labels such as "kd [kd+u600.pt]" are not markup
    table = Table(title=f"compare on {report['split']}")
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row, style="dim" if row[0].startswith("  ") else None)
    table.caption = CAPTION
    return table


def csv_text(report: dict[str, Any]) -> str:
    """Long format: one line per (row, metric) with the numbers themselves."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "kind", "metric", "mean", "sd", "n", "low", "high", "mcnemar_p"])
    for label, model in report["models"].items():
        for metric, s in model["summary"].items():
            writer.writerow([label, "model", metric, s["mean"], s["sd"], s["n"], "", "", ""])
    for name, difference in report["differences"].items():
        for metric, d in difference["seeds"].items():
            if d:
                writer.writerow([name, "seed-paired difference", metric, d["mean"], d["sd"], len(d["seeds"]), "",
                                 "", ""])
        for scope, result in difference["per_sample"].items():
            if result:
                for metric in BOOTSTRAPPED:
                    writer.writerow([name, "per-sample difference", f"{scope} {metric}".strip(), "", "",
                                     result["samples"], result[metric]["low"], result[metric]["high"],
                                     result["mcnemar_p"]])
    return buffer.getvalue()


def html_text(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
    return (f"<!doctype html><meta charset='utf-8'><title>kdcli compare</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>compare on {html.escape(report['split'])}</h1><table><tr>{cells}</tr>{body}</table>"
            f"<p>{html.escape(CAPTION)}</p>"
            + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "") + "\n")


def check_outputs(*paths: Path | None) -> None:
    """Before any checkpoint is evaluated: an output that cannot be written is said first, not last."""
    for path in filter(None, paths):
        if Path(path).is_dir():
            raise KdcliError("is a directory", path=path, hint="give a file name, e.g. compare.csv")


def write_outputs(report: dict[str, Any], csv_path: Path | None, html_path: Path | None,
                  json_path: Path | None) -> None:
    from kdcli.shards.format import atomic_write_bytes

    check_outputs(csv_path, html_path, json_path)
    for path, text in ((csv_path, csv_text), (html_path, html_text),
                       (json_path, lambda r: json.dumps(r, indent=2) + "\n")):
        if path is not None:
            atomic_write_bytes(Path(path), text(report).encode())
