"""`kdcli explain`: Grad-CAM overlays (and top concepts for concept-head models) for a few images of one
split, written as PNGs, explain.json and a self-contained index.html that is written last.

On datasets with several label spaces a checkpoint explains the rows of its task(s); a multi-head model (SALL)
gets one overlay per head on the same image, side by side, each for that head's predicted grade."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.engine.device import select_device
from kdcli.errors import DiskFull, KdcliError, UsageError
from kdcli.evaluate.run import head_for, label_tasks, predict_view, split_view
from kdcli.explain.common import (
    ExplainOptions,
    check_options,
    grad_cams,
    grid_warning,
    pick_indices,
    predict,
    render_panel,
    safe_name,
    top_concepts,
    write_png,
    write_report,
)
from kdcli.explain.page import CURVES_FILE, Page, classification_metrics_html, copy_curves, page_title, render_page
from kdcli.locks import output_lock
from kdcli.models.loading import load_model
from kdcli.shards.reader import ShardStore
from kdcli.storage import remove_leftovers
from kdcli.train_images import check_compatible

REPORT_PAGE, REPORT_JSON = "index.html", "explain.json"
PANEL_NAME = re.compile(r"^\d+_.+\.png$")  # every explain variant names its images NN_<sample>.png


def report_files(folder: Path) -> list[Path]:
    """The files of an explain report in `folder`: its page, its JSON and its panels (the NN_*.png names, and any
    file its explain.json lists); other files in the folder are not the report's and are left alone."""
    if not folder.is_dir():
        return []
    listed: set[str] = set()
    try:
        listed = {str(r["file"]) for r in json.loads((folder / REPORT_JSON).read_text()).get("images", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return sorted(path for path in folder.iterdir() if path.is_file() and (
        path.name in (REPORT_PAGE, REPORT_JSON, CURVES_FILE) or PANEL_NAME.match(path.name) or path.name in listed))


def check_out_folder(out: Path, overwrite: bool) -> None:
    """--out is new, or holds no report, or holds one that --overwrite replaces."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if report_files(out) and not overwrite:
        raise KdcliError("holds an earlier explain report", path=out,
                         hint="pass --overwrite to replace it, or choose another --out")


def publish_report(staging: Path, out: Path) -> None:
    """Put the finished report in `staging` at `out`: a new folder is renamed into place whole; into an existing
    one, the earlier report's page goes first (no page ever shows old and new panels mixed), then its other
    files, then the new panels and JSON, the new page last. The folder's other files stay."""
    if not out.exists():
        staging.rename(out)
        return
    (out / REPORT_PAGE).unlink(missing_ok=True)
    for old in report_files(out):
        old.unlink(missing_ok=True)
    for new in sorted(staging.iterdir()):
        if new.name != REPORT_PAGE:
            os.replace(new, out / new.name)
    os.replace(staging / REPORT_PAGE, out / REPORT_PAGE)
    staging.rmdir()


def explain(options: ExplainOptions, log: Callable[[str], None] | None = None) -> Path:
    """Explain into a folder built beside --out and published when done, under --out's lock: a failure leaves
    the earlier report as it was, and a replaced report never keeps panels of the old one. `log` gets each of
    the report's warnings (a result that means nothing), as the page shows them."""
    out = Path(options.out)
    check_out_folder(out, options.overwrite)
    with output_lock(out, f"kdcli explain {options.checkpoint} --out {out}"):
        check_out_folder(out, options.overwrite)  # again under the lock: another run may have just finished
        remove_leftovers(out, ("staging",))
        staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
        try:
            index = _explain(dataclasses.replace(options, out=staging))
            warnings = json.loads((staging / REPORT_JSON).read_text()).get("warnings", [])
            publish_report(staging, out)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, DiskFull) and exc.path.is_relative_to(staging):  # name the file asked for
                raise DiskFull(out / exc.path.relative_to(staging), exc.hint) from None
            raise
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    for line in warnings:
        say(f"warning: {line}")
    return out / index.name


def _explain(options: ExplainOptions) -> Path:
    meta = load_checkpoint(Path(options.checkpoint)).meta
    if options.data is None:  # the dataset it was trained on, if still there unchanged
        from kdcli.defaults import recorded_dataset

        options.data = recorded_dataset(meta, Path(options.checkpoint))
    from kdcli.tasks import task_of

    return task_of(meta).run("explain", options)


def explain_images(options: ExplainOptions) -> Path:
    """Grad-CAM (and concept evidence) of a classifier on a few test images of each class."""
    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    store = ShardStore(options.data)
    check_compatible(checkpoint, store)
    meta, modality = checkpoint.meta, checkpoint.meta["modality"]
    tasks = label_tasks(meta)  # [] on a dataset with one label space
    heads = [head_for(meta, task) for task in tasks] or [None]  # aligned with tasks when there are any
    view = split_view(store, options.split, modality, tasks)
    # Grade-major, task-minor groups: a few picks already show both sets, and every grade of each in turn.
    picks = pick_indices(view.labels * max(1, len(tasks)) + view.tasks, options.count)
    images = torch.stack([view[i]["image"] for i in picks])
    model = load_model(checkpoint)
    device = select_device(options.device)
    model.to(device)
    probs, sims, grid = predict(model, images, device, options.batch_size, heads)
    predictions = [p.argmax(1) for p in probs]
    cams = [grad_cams(model, images, p.tolist(), device, options.batch_size, head=head)
            for p, head in zip(predictions, heads, strict=True)]

    head_classes = [store.meta.classes_for(task) for task in tasks] or [store.classes]
    concept_names = list(model.spec.get("concepts") or [])
    width = max(2, len(str(len(picks))))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, (i, image) in enumerate(zip(picks, images.numpy(), strict=True)):
        file = f"{n + 1:0{width}d}_{safe_name(view.ids[i])}.png"
        write_png(out / file, render_panel(image, [c[n] for c in cams]))
        per_head = [{"task": task, "prediction": int(p[n]), "prediction_name": head_classes[k][int(p[n])],
                     "probability": round(float(probs[k][n, p[n]]), 4)}
                    for k, (task, p) in enumerate(zip(tasks or [None], predictions, strict=True))]
        own = int(view.tasks[i])  # the head of the task this image is labelled for
        label, classes = int(view.labels[i]), head_classes[own]
        records.append({
            "file": file, "id": view.ids[i], **({"task": tasks[own]} if tasks else {}),
            "label": label, "label_name": classes[label],
            **{k: per_head[own][k] for k in ("prediction", "prediction_name", "probability")},
            "correct": label == per_head[own]["prediction"],
            "concepts": top_concepts(None if sims is None else sims[n], concept_names, options.top_concepts),
            **({"heads": per_head} if tasks else {}),
        })
    metrics = split_metrics(model, store, options, meta, tasks, device)
    curves, curves_source = copy_curves(Path(options.checkpoint), out)
    report = {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "modality": modality, "kind": meta.get("kind"), "method": meta.get("method"),
        "backbone": model.spec["backbone"], "head": model.spec["head"],
        "classes": dict(zip(tasks, head_classes, strict=True)) if tasks else store.classes,
        **({"tasks": tasks} if tasks else {}),
        "cam_layer": "feature_map", "cam_grid": list(grid),
        "metrics": metrics if tasks else metrics[""], "curves": curves, "curves_source": curves_source,
        "warnings": classification_warnings(grid, model.spec, metrics, options.split), "images": records,
    }
    return write_report(out, report, render_page(classification_page(report)))


def split_metrics(model: torch.nn.Module, store: ShardStore, options: ExplainOptions, meta: dict[str, Any],
                  tasks: list[str], device: torch.device) -> dict[str, dict[str, Any]]:
    """Metrics of the whole split (the drawn images are a handful), per label space ("" for a dataset with one),
    with each confusion matrix also row-normalised."""
    from kdcli.explain.page import row_normalised
    from kdcli.metrics.classification import classification_metrics

    results = {}
    for task in tasks or [None]:
        view = split_view(store, options.split, meta["modality"], [task] if task else None)
        probs, labels, _ = predict_view(model, view, device, head_for(meta, task), options.batch_size)
        classes = store.meta.classes_for(task) if task else store.classes
        ordinal = bool(task and store.meta.tasks[task].get("ordinal"))
        scores = classification_metrics(labels, probs, classes, ordinal=ordinal)
        scores["confusion_matrix_normalised"] = [[None if v is None else round(v, 4) for v in row]
                                                 for row in row_normalised(scores["confusion_matrix"])]
        results[task or ""] = scores
    return results


def shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def classification_warnings(grid: tuple[int, int], spec: dict[str, Any], metrics: dict[str, dict[str, Any]],
                            split: str) -> list[str]:
    """Results that mean nothing: a CAM grid too coarse to localise, a model no better than guessing (by
    kdcli.compare's rule, so explain and compare call the same models at chance)."""
    from kdcli.compare import at_chance

    lines = [line for line in [grid_warning(grid, spec)] if line]
    for task, scores in metrics.items():
        if at_chance({"kappa": scores["kappa"], "auc": scores["auc"]}):
            lines.append(f"the model is at chance on {split}{f' ({task})' if task else ''} (kappa "
                         f"{shown(scores['kappa'])}, AUC {shown(scores['auc'])}): its heat maps show what a model "
                         "that learnt nothing looks at")
    return lines


MARKS = {True: '<span class="ok">&#10003; correct</span>', False: '<span class="bad">&#10007; wrong</span>'}


def caption(r: dict[str, Any]) -> str:
    """One image's figcaption: truth and prediction, or with several heads, truth (of the set the image
    comes from) and each head's prediction; only the labelled task's head can be marked right or wrong."""
    esc = html.escape
    source = f"set: {esc(r['task'])} &middot; " if "task" in r else ""
    heads = r.get("heads", [])
    if len(heads) > 1:
        rows = "".join(
            f"<tr><td>{esc(h['task'])} head</td><td>{esc(h['prediction_name'])}</td><td>{h['probability']:.2f}</td>"
            f"<td>{MARKS[r['correct']] if h['task'] == r['task'] else ''}</td></tr>" for h in heads)
        body = f"{source}true: {esc(r['label_name'])}<table>{rows}</table>"
    else:
        body = (f"{source}true: {esc(r['label_name'])} &middot; predicted: {esc(r['prediction_name'])} "
                f"({r['probability']:.2f}) {MARKS[r['correct']]}")
    concepts = "".join(f"<tr><td>{esc(c['name'])}</td><td>{c['similarity']:.3f}</td></tr>" for c in r["concepts"])
    return f"<figcaption><b>{esc(r['id'])}</b><br>{body}" + (f"<table>{concepts}</table>" if concepts else "") + \
        "</figcaption>"


def classification_page(report: dict[str, Any]) -> Page:
    esc = html.escape
    images = report["images"]
    right = sum(r["correct"] for r in images)
    tasks = report.get("tasks") or []
    several = len(tasks) > 1
    figure = '<figure class="wide">' if several else "<figure>"
    cards = [f'{figure}<img src="{esc(r["file"])}" alt="{esc(r["id"])}">{caption(r)}</figure>' for r in images]
    layout = (f"left to right: image, then Grad-CAM of each head's predicted grade ({', '.join(tasks)})" if several
              else "left: image, right: Grad-CAM of the predicted class")
    scope = f" · {' and '.join(tasks)} rows" if tasks else ""
    about = (f"{report['modality']}{scope} · {report['kind']} ({report['method']}) · {report['backbone']}, "
             f"{report['head']} head · {right}/{len(images)} correct"
             f"{' on their own task' if several else ''} · {layout}")
    classes = report["classes"]
    metrics = ("".join(classification_metrics_html(report["metrics"][task], classes[task], task) for task in tasks)
               if tasks else classification_metrics_html(report["metrics"], classes))
    return Page(page_title(report), about, warnings=report["warnings"], metrics=metrics, curves=report["curves"],
                curves_source=report["curves_source"], samples=cards, samples_heading="Images", grid=True)
