"""`kdcli explain` on a multi-label chest X-ray dataset: does the model look where the radiologist looked?

For up to `count` annotated images of one split (gaze heat map and/or boxes; in id order), and for each positive
finding of the image (the top predicted one when it has none), the Grad-CAM of that label's logit, drawn beside
the X-ray, the gaze heat map and the box outline, with agreement scores between the CAM and the annotations:

    NSS  normalised scanpath saliency with the gaze heat map as the fixation density:
         sum(zscore(cam) * gaze) / sum(gaze)  (0: chance; higher: the CAM is high where the reader looked)
    AUC  the CAM as a score separating the gaze pixels above half the map's maximum from the rest
         (sklearn roc_auc_score; 0.5: chance, 1: every fixated pixel above every other)
    IoU  of the CAM's top TOP_FRACTION pixels (those at or above its 90th percentile, ties included; a flat map
         selects nothing) with the union of the image's boxes

All three are computed at the stored image size (the CAM is upsampled to it by Grad-CAM). For a CVI student
whose stage-1 teacher still loads, the teacher's CAMs of the same findings are scored too, so the report compares
them. Written as PNGs, explain.json and a self-contained index.html that is written last; `gaze_agreement` gives
the mean scores alone."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kdcli.data.views import ModalityView
from kdcli.engine.checkpoint import Checkpoint, file_sha256, load_checkpoint
from kdcli.engine.device import select_device
from kdcli.errors import KdcliError, UsageError
from kdcli.explain.common import (
    MIN_SIDE,
    SPLITS,
    ExplainOptions,
    check_options,
    grad_cams,
    grid_warning,
    safe_name,
    write_png,
    write_report,
)
from kdcli.explain.page import Page, copy_curves, fmt, page_title, render_page
from kdcli.explain.segmentation import render_row
from kdcli.models.loading import load_model
from kdcli.shards.reader import ShardStore
from kdcli.train_images import check_compatible

TOP_FRACTION = 0.1  # the CAM's top 10% of pixels are its "region" for the IoU with the boxes
GAZE_FRACTION = 0.5  # gaze pixels above half the heat map's maximum are the positives of the AUC
UNKNOWN = 255  # label value for "not stated" (uncertain policies)
BOX_COLOUR = (0, 255, 0)
METRICS = ("nss", "auc", "iou")


# ------------------------------------------------------------------------------------------ scores
def zscore(cam: np.ndarray) -> np.ndarray:
    cam = cam.astype(np.float64)
    std = float(cam.std())
    return (cam - cam.mean()) / std if std > 1e-12 else np.zeros_like(cam)


def nss(cam: np.ndarray, gaze: np.ndarray) -> float | None:
    """Fixation-weighted mean of the z-scored CAM (None without gaze; 0 for a flat CAM)."""
    weights = gaze.astype(np.float64)
    total = float(weights.sum())
    if total <= 0:
        return None
    return float((zscore(cam) * weights).sum() / total)


def gaze_auc(cam: np.ndarray, gaze: np.ndarray, fraction: float = GAZE_FRACTION) -> float | None:
    """ROC AUC of the CAM for gaze > fraction * max vs the rest (None without gaze or with one class only)."""
    from sklearn.metrics import roc_auc_score

    gaze = gaze.astype(np.float64)
    peak = float(gaze.max()) if gaze.size else 0.0
    if peak <= 0:
        return None
    positive = (gaze > fraction * peak).ravel()
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, cam.astype(np.float64).ravel()))


def top_mask(cam: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Pixels at or above the CAM's (1 - fraction) quantile, ties included; nothing for a flat map."""
    cam = cam.astype(np.float64)
    threshold = float(np.quantile(cam, 1.0 - fraction))
    return (cam >= threshold) & (cam > cam.min())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty: they agree)."""
    a, b = a.astype(bool), b.astype(bool)
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def agreement(cam: np.ndarray, gaze: np.ndarray | None, boxes: np.ndarray | None) -> dict[str, float | None]:
    """NSS, AUC (None without gaze) and IoU with the boxes (None without boxes) of one (H, W) CAM."""
    has_gaze = gaze is not None and float(gaze.max()) > 0
    has_boxes = boxes is not None and bool(boxes.any())
    scores = {"nss": nss(cam, gaze) if has_gaze else None, "auc": gaze_auc(cam, gaze) if has_gaze else None,
              "iou": mask_iou(top_mask(cam), boxes) if has_boxes else None}
    return {k: (None if v is None else round(v, 4)) for k, v in scores.items()}


def mean_scores(scores: list[dict[str, float | None]]) -> dict[str, Any]:
    """Mean of each score over the (image, finding) pairs that have it, and how many do."""
    means: dict[str, Any] = {}
    counts = {}
    for metric in METRICS:
        values = [s[metric] for s in scores if s.get(metric) is not None]
        means[metric] = round(float(np.mean(values)), 4) if values else None
        counts[metric] = len(values)
    return {**means, "n": counts}


# ------------------------------------------------------------------------------------------ data
@dataclass
class Sample:
    index: int  # in the view
    id: str
    image: torch.Tensor  # (C, H, W) uint8
    labels: np.ndarray  # (classes,) uint8
    gaze: np.ndarray | None  # (H, W) float in [0, 1], None when the image has no gaze
    boxes: np.ndarray | None  # (H, W) bool, None when the image has no boxes


def annotated_samples(store: ShardStore, split: str, modality: str, count: int | None) -> list[Sample]:
    """Up to `count` images of the split with a gaze heat map or boxes, in id order."""
    targets = store.meta.targets or {}
    if "labels" not in targets or not ({"gaze", "boxes"} & set(targets)):
        raise KdcliError("the dataset has no gaze heat maps or box masks", path=store.root,
                         hint="prepare it with --gaze and/or --boxes")
    names = tuple(t for t in ("labels", "gaze", "boxes", "annotated") if t in targets)
    view = ModalityView(store, split, modality, targets=names)
    chosen: list[tuple[str, int, bool, bool]] = []
    for i in sorted(range(len(view)), key=lambda i: view.ids[i]):
        shard, row = view.shards[i], int(view.indices[i])
        if "annotated" in targets:
            flags = store.read(shard, row, "annotated")
            has_gaze, has_boxes = bool(flags[0]) and "gaze" in targets, bool(flags[1]) and "boxes" in targets
        else:
            has_gaze = "gaze" in targets and bool(store.read(shard, row, "gaze").any())
            has_boxes = "boxes" in targets and bool(store.read(shard, row, "boxes").any())
        if has_gaze or has_boxes:
            chosen.append((view.ids[i], i, has_gaze, has_boxes))
        if count is not None and len(chosen) == count:
            break
    if not chosen:
        raise KdcliError(f"no images with gaze or boxes in split {split!r} ({len(view)} images)",
                         path=store.root, hint="explain another --split, or prepare with --gaze/--boxes")
    samples = []
    for sample_id, i, has_gaze, has_boxes in chosen:
        item = view[i]
        gaze = item["gaze"][0].numpy().astype(np.float32) / 255.0 if has_gaze else None
        boxes = item["boxes"][0].numpy() > 127 if has_boxes else None
        samples.append(Sample(i, sample_id, item["image"], item["labels"].numpy(),
                              gaze if gaze is not None and gaze.max() > 0 else None,
                              boxes if boxes is not None and boxes.any() else None))
    return samples


# ------------------------------------------------------------------------------------------ models
def probabilities(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                  batch_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Sigmoid probabilities (N, classes) and the CAM layer's grid size."""
    grids: list[tuple[int, int]] = []
    hook = model.feature_map.register_forward_hook(lambda _m, _i, out: grids.append(tuple(out.shape[-2:])))
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunks.append(model(images[start:start + batch_size].to(device))["logits"].float().sigmoid().cpu())
    finally:
        hook.remove()
    return torch.cat(chunks).numpy(), grids[0]


def load_cvi_teacher(checkpoint: Checkpoint, store: ShardStore) -> tuple[Any, str | None, str]:
    """(stage-1 model, its path, note) for a CVI student whose teacher still loads; (None, None, why) otherwise."""
    meta = checkpoint.meta
    info = meta.get("teacher") or {}
    if isinstance(info, list):
        info = info[0] if info else {}
    if meta.get("kind") != "student" or meta.get("method") != "cvi" or not info.get("path"):
        return None, None, "not a CVI student: no teacher comparison"
    path = Path(info["path"])
    try:
        teacher_checkpoint = load_checkpoint(path)
        check_compatible(teacher_checkpoint, store)
        if teacher_checkpoint.meta.get("modality") != meta.get("modality"):
            raise KdcliError(f"teacher modality {teacher_checkpoint.meta.get('modality')!r} is not the student's",
                             path=path)
        teacher = load_model(teacher_checkpoint)
    except (KdcliError, OSError, KeyError, RuntimeError) as exc:
        return None, None, f"teacher comparison skipped: {exc}"
    note = f"teacher (stage 1) CAMs from {path}"
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        note += " (the file changed since distillation)"
    return teacher, str(path), note


@dataclass
class Scored:
    samples: list[Sample]
    pairs: list[tuple[int, int, str]]  # (sample position, class index, "label" | "predicted")
    probs: np.ndarray
    cams: np.ndarray  # (pairs, H, W)
    scores: list[dict[str, float | None]]
    grid: tuple[int, int]
    teacher_probs: np.ndarray | None
    teacher_cams: np.ndarray | None
    teacher_scores: list[dict[str, float | None]] | None
    teacher_path: str | None
    teacher_note: str
    model: torch.nn.Module


def score(checkpoint: Checkpoint, store: ShardStore, split: str, count: int | None, device: torch.device,
          batch_size: int) -> Scored:
    check_compatible(checkpoint, store)
    from kdcli.tasks import task_of

    if task_of(store.meta).activation != "sigmoid":
        raise KdcliError(f"gaze agreement needs a multi-label dataset; this one is {store.meta.task!r}",
                         path=store.root)
    modality = checkpoint.meta["modality"]
    samples = annotated_samples(store, split, modality, count)
    images = torch.stack([s.image for s in samples])
    model = load_model(checkpoint).to(device)
    probs, grid = probabilities(model, images, device, batch_size)
    pairs: list[tuple[int, int, str]] = []
    for n, sample in enumerate(samples):
        positives = np.flatnonzero(sample.labels == 1)
        if len(positives):
            pairs += [(n, int(c), "label") for c in positives]
        else:
            pairs.append((n, int(np.argmax(probs[n])), "predicted"))
    pair_images = images[[n for n, _, _ in pairs]]
    targets = [c for _, c, _ in pairs]

    def cams_and_scores(net: torch.nn.Module) -> tuple[np.ndarray, list[dict[str, float | None]]]:
        cams = grad_cams(net, pair_images, targets, device, batch_size)
        return cams, [agreement(cams[k], samples[n].gaze, samples[n].boxes) for k, (n, _, _) in enumerate(pairs)]

    cams, scores = cams_and_scores(model)
    teacher, teacher_path, note = load_cvi_teacher(checkpoint, store)
    teacher_probs = teacher_cams = teacher_scores = None
    if teacher is not None:
        teacher = teacher.to(device)
        teacher_probs, _ = probabilities(teacher, images, device, batch_size)
        teacher_cams, teacher_scores = cams_and_scores(teacher)
    return Scored(samples, pairs, probs, cams, scores, grid, teacher_probs, teacher_cams, teacher_scores,
                  teacher_path, note, model)


def gaze_agreement(checkpoint_path: str | Path, data: str | Path, split: str = "test", count: int | None = None,
                   device: str = "auto", batch_size: int = 32) -> dict[str, Any]:
    """Mean NSS, AUC and IoU of a checkpoint's Grad-CAMs against gaze and boxes on the annotated images of a
    split (all of them unless `count`): {"split", "images", "findings", "model": {nss, auc, iou, n},
    "teacher": the same for a CVI student's stage-1 teacher, or None}."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: use train, dev or test")
    if count is not None and count < 1:
        raise UsageError(f"count {count}: score at least one image")
    scored = score(load_checkpoint(Path(checkpoint_path)), ShardStore(data), split, count, select_device(device),
                   batch_size)
    return {"split": split, "images": len(scored.samples), "findings": len(scored.pairs),
            "model": mean_scores(scored.scores),
            "teacher": mean_scores(scored.teacher_scores) if scored.teacher_scores is not None else None}


# ------------------------------------------------------------------------------------------ drawing
def tiles_for(image: np.ndarray, cams: dict[str, np.ndarray], gaze: np.ndarray | None,
              boxes: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    """X-ray | CAM overlay(s) | gaze overlay | box outline, upscaled by a whole factor (nearest for pixels and
    boxes, bilinear for the heat maps); the box outline is drawn on the CAMs too."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = image[0]
    height, width = grey.shape
    scale = max(1, math.ceil(MIN_SIDE / min(height, width)))
    size = (width * scale, height * scale)
    big = np.repeat(cv2.resize(grey, size, interpolation=cv2.INTER_NEAREST)[..., None], 3, axis=2)
    base = big.astype(np.float32) / 255.0
    contours = []
    if boxes is not None:
        big_boxes = cv2.resize(boxes.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big_boxes, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)

    def outline(rgb: np.ndarray) -> np.ndarray:
        return cv2.drawContours(np.ascontiguousarray(rgb), contours, -1, BOX_COLOUR, 1) if contours else rgb

    def overlay(heat: np.ndarray) -> np.ndarray:
        big_heat = np.clip(cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
        return show_cam_on_image(base, big_heat, use_rgb=True)

    tiles = [("x-ray", big)] + [(f"{who} CAM", outline(overlay(cam))) for who, cam in cams.items()]
    tiles.append(("gaze", overlay(gaze)) if gaze is not None else ("no gaze", big.copy()))
    tiles.append(("boxes", outline(big.copy())) if boxes is not None else ("no boxes", big.copy()))
    return tiles


# ------------------------------------------------------------------------------------------ explain
def explain_multilabel(options: ExplainOptions) -> Path:
    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    store = ShardStore(options.data)
    scored = score(checkpoint, store, options.split, options.count, select_device(options.device),
                   options.batch_size)
    meta, classes = checkpoint.meta, store.classes
    has_teacher = scored.teacher_scores is not None
    who = "student" if has_teacher else "model"
    width = max(2, len(str(len(scored.pairs))))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (n, c, source) in enumerate(scored.pairs):
        sample = scored.samples[n]
        cams = {who: scored.cams[k]}
        if has_teacher:
            cams["teacher"] = scored.teacher_cams[k]
        tiles = tiles_for(sample.image.numpy(), cams, sample.gaze, sample.boxes)
        file = f"{k + 1:0{width}d}_{safe_name(sample.id)}_{safe_name(classes[c])}.png"
        write_png(out / file, render_row(tiles))
        label = int(sample.labels[c])
        record = {
            "file": file, "id": sample.id, "finding": classes[c], "finding_index": c, "finding_source": source,
            "label": None if label == UNKNOWN else label, "probability": round(float(scored.probs[n, c]), 4),
            "has_gaze": sample.gaze is not None, "has_boxes": sample.boxes is not None,
            "scores": scored.scores[k], "tiles": [title for title, _ in tiles],
        }
        if has_teacher:
            record["teacher"] = {"probability": round(float(scored.teacher_probs[n, c]), 4),
                                 "scores": scored.teacher_scores[k]}
        records.append(record)
    means = {"model": mean_scores(scored.scores)}
    if has_teacher:
        means["teacher"] = mean_scores(scored.teacher_scores)
    curves, curves_source = copy_curves(Path(options.checkpoint), out)
    warning = grid_warning(scored.grid, scored.model.spec)
    report = {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "task": "multilabel", "modality": meta["modality"], "kind": meta.get("kind"), "method": meta.get("method"),
        "backbone": scored.model.spec["backbone"], "head": scored.model.spec["head"], "classes": classes,
        "cam_layer": "feature_map", "cam_grid": list(scored.grid),
        "scores": {"nss": "sum(zscore(cam) * gaze) / sum(gaze), the gaze heat map as fixation density",
                   "auc": f"ROC AUC of the CAM for gaze > {GAZE_FRACTION} * max vs the other pixels",
                   "iou": f"IoU of the CAM's top {TOP_FRACTION:.0%} pixels (>= its {1 - TOP_FRACTION:.0%} quantile, "
                          "ties included; none for a flat map) with the union of the boxes"},
        "top_fraction": TOP_FRACTION, "gaze_fraction": GAZE_FRACTION,
        "teacher": {"compared": has_teacher, "path": scored.teacher_path, "note": scored.teacher_note},
        "annotated_images": len(scored.samples), "means": means, "curves": curves, "curves_source": curves_source,
        "warnings": [warning] if warning else [], "images": records,
    }
    return write_report(out, report, render_page(gaze_page(report)))


# ------------------------------------------------------------------------------------------ html
def score_row(name: str, probability: float, scores: dict[str, float | None]) -> str:
    cells = "".join(f"<td>{fmt(scores[m])}</td>" for m in METRICS)
    return f"<tr><td>{html.escape(name)}</td><td>{probability:.2f}</td>{cells}</tr>"


def figure_html(r: dict[str, Any], who: str) -> str:
    esc = html.escape
    truth = {"label": "positive finding", "predicted": "no positive finding: top prediction"}[r["finding_source"]]
    rows = score_row(who, r["probability"], r["scores"])
    if "teacher" in r:
        rows += score_row("teacher", r["teacher"]["probability"], r["teacher"]["scores"])
    caption = (f"<b>{esc(r['id'])}</b> &middot; {esc(r['finding'])} ({truth}) &middot; "
               f"gaze {'yes' if r['has_gaze'] else 'no'}, boxes {'yes' if r['has_boxes'] else 'no'}"
               f"<table><tr><th></th><th>p</th><th>NSS</th><th>AUC</th><th>IoU</th></tr>{rows}</table>"
               f"left to right: {esc(', '.join(r['tiles']))}")
    return f'<figure><img src="{esc(r["file"])}" alt="{esc(r["id"])}"><figcaption>{caption}</figcaption></figure>'


def gaze_page(report: dict[str, Any]) -> Page:
    esc = html.escape
    images = report["images"]
    compared = report["teacher"]["compared"]
    who = "student" if compared else "model"
    about = (f"{report['modality']} · {report['kind']} ({report['method']}) · {report['backbone']}, "
             f"{report['head']} head · {report['annotated_images']} annotated images, {len(images)} findings · "
             "Grad-CAM of each positive finding's logit (the top prediction where the image has none)")
    summary = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{fmt(m[k])} <small>(n={m['n'][k]})</small></td>" for k in METRICS)
        + "</tr>" for name, m in (((who, report["means"]["model"]),)
                                  + ((("teacher", report["means"]["teacher"]),) if compared else ())))
    definitions = "".join(f"<li><b>{k.upper()}</b>: {esc(v)}</li>" for k, v in report["scores"].items())
    teacher = report["teacher"]["note"]
    metrics = (f"<table><tr><th></th><th>NSS</th><th>AUC</th><th>IoU</th></tr>{summary}</table>\n"
               f"<p>{esc(teacher)}</p>\n<ul>{definitions}</ul>\n<p>Box outlines in green on the CAMs and the boxes "
               "tile.</p>\n")
    return Page(page_title(report), about, warnings=report["warnings"], metrics=metrics,
                metrics_heading="Agreement with gaze and boxes (means)", curves=report["curves"],
                curves_source=report["curves_source"], samples=[figure_html(r, who) for r in images],
                samples_heading="Images")
