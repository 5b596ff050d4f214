"""`kdcli explain` on a slide (MIL) checkpoint: for a few slides of one split, one PNG of the slide's attention
heat map (each patch's rectangle on the thumbnail coloured by its attention weight, normalised to the slide's
largest), the top-k patches by attention and, for models with a clinical branch, the clinical features'
contributions to the predicted class. Written as PNGs, explain.json and a self-contained index.html that is
written last.

Thumbnail: prepare's `thumbnails/<slide>.png` (the tissue-mask view: non-tissue dimmed, kept patches boxed in
green, upscaled by a whole factor) when present, else a mosaic of the slide's patches placed at their level-0
`coords`, scaled down. Either way level-0 coordinates map to it by its width / the slide's level-0 width
(records.json `dimensions`; the patch side is `patch_level0`).

Attention: the branch the model's routed logits come from (mm where the clinical record is present and the
model has a fusion branch, else sm); a bidirectional model's other branch is drawn beside it.

Clinical contributions (occlusion): for each observed feature, the predicted-class probability with the full
record minus that with the feature masked out (value 0, indicator 0, as a missing cell is encoded); positive:
the feature pushes towards the prediction. Patch features are encoded once and reused for every occlusion.

Slides are picked deterministically: round-robin over classes, slides in id order within each class."""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.engine.device import select_device
from kdcli.engine.loop import to_device
from kdcli.errors import KdcliError
from kdcli.explain.common import (
    GAP,
    MIN_SIDE,
    ExplainOptions,
    check_options,
    pick_indices,
    safe_name,
    write_png,
    write_report,
)
from kdcli.explain.page import Page, copy_curves, page_title, render_page
from kdcli.shards.format import RECORDS_JSON
from kdcli.shards.reader import ShardStore

TOP_K = 6
TOP_SIDE = 96  # px per patch in the top-k strip
MAX_SIDE = 1024  # longest side of a drawn thumbnail
MOSAIC_SIDE = 512  # longest side of a mosaic built from the patches
BAR_ROWS = 12  # clinical features drawn (largest |contribution| first); explain.json has all
ALPHA = 0.55
TITLE = 18
POSITIVE, NEGATIVE = (40, 160, 60), (200, 50, 50)


# ------------------------------------------------------------------------------------------ model
def attention_branch(out: dict[str, torch.Tensor], present: bool) -> str:
    """The branch the routed logits come from (the rule of MILClassifier.forward and predict_bags)."""
    if "attention_sm" in out and not present:
        return "sm"
    return "mm" if "attention_mm" in out else "sm"


@contextlib.contextmanager
def cached_patches(model: torch.nn.Module, features: torch.Tensor) -> Iterator[None]:
    """Within the block, `model.encode` returns `features` (1, K, F) for any bag batch (expanded to its size),
    so re-running the heads on edited clinical records does not re-encode every patch."""
    model.encode = lambda patches: features.expand(patches.shape[0], -1, -1)
    try:
        yield
    finally:
        del model.encode


@torch.no_grad()
def clinical_occlusion(model: torch.nn.Module, batch: dict[str, torch.Tensor], target: int) -> np.ndarray:
    """(D,) change in the softmax probability of class `target` of `model(batch)["logits"]` (one-slide batch)
    when each observed clinical feature is masked out (value 0, indicator 0): full minus masked, so positive
    values support `target`. NaN for features that are not observed."""
    observed = np.flatnonzero(batch["clinical_mask"][0].float().cpu().numpy() > 0)
    deltas = np.full(batch["clinical_mask"].shape[-1], np.nan, np.float64)
    if len(observed) == 0:
        return deltas
    count = len(observed) + 1  # row 0: the full record; row k: feature observed[k - 1] masked
    edited = {key: (value.expand(count, *value.shape[1:]) if isinstance(value, torch.Tensor) else value)
              for key, value in batch.items()}
    clinical, mask = edited["clinical"].clone(), edited["clinical_mask"].clone()
    rows = torch.arange(1, count, device=clinical.device)
    columns = torch.as_tensor(observed, device=clinical.device)
    clinical[rows, columns] = 0
    mask[rows, columns] = 0
    edited["clinical"], edited["clinical_mask"] = clinical, mask
    probs = model(edited)["logits"].float().softmax(-1)[:, target].cpu().numpy()
    deltas[observed] = probs[0] - probs[1:]
    return deltas


@torch.no_grad()
def explain_bag(model: torch.nn.Module, item: dict, device: torch.device) -> dict[str, Any]:
    """One slide: probabilities, the used branch, each branch's attention (K,) and, with a fusion branch and a
    clinical record, the occlusion contributions to the predicted class."""
    from kdcli.data.bags import collate_bags

    batch = to_device(collate_bags([item]), device, False)
    features = model.bag_features(batch)
    with cached_patches(model, features):
        out = model(batch)
        probs = out["logits"].float().softmax(-1)[0].cpu().numpy()
        present = bool(batch["clinical_present"][0])
        branch = attention_branch(out, present)
        attention = {b: out[f"attention_{b}"][0].float().cpu().numpy() for b in ("mm", "sm") if
                     f"attention_{b}" in out}
        contributions = None
        if "logits_mm" in out and present and branch == "mm":
            contributions = clinical_occlusion(model, batch, int(probs.argmax()))
    return {"probs": probs, "branch": branch, "attention": attention, "contributions": contributions}


# ------------------------------------------------------------------------------------------ geometry
def slide_geometry(info: dict[str, Any], coords: np.ndarray, patch_px: int) -> tuple[tuple[int, int], int]:
    """((width, height) of level 0, patch side in level-0 px) from records.json, else from the coordinates."""
    side = int(info.get("patch_level0") or 0)
    if side <= 0:
        steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
        steps = np.concatenate([s[s > 0] for s in steps])
        side = int(steps.min()) if len(steps) else patch_px
    dims = info.get("dimensions")
    if not dims:
        dims = [int(coords[:, 0].max()) + side, int(coords[:, 1].max()) + side]
    return (int(dims[0]), int(dims[1])), side


def mosaic(patches: np.ndarray, coords: np.ndarray, dims: tuple[int, int], side: int) -> np.ndarray:
    """The slide rebuilt from its patches (HWC RGB) on white, at most MOSAIC_SIDE px and never finer than the
    stored patch pixels."""
    scale = min(patches.shape[1] / side, MOSAIC_SIDE / max(dims))
    canvas = np.full((max(1, round(dims[1] * scale)), max(1, round(dims[0] * scale)), 3), 255, np.uint8)
    for patch, (x, y) in zip(patches, coords, strict=True):
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = max(x0 + 1, round((x + side) * scale)), max(y0 + 1, round((y + side) * scale))
        x1, y1 = min(x1, canvas.shape[1]), min(y1, canvas.shape[0])
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return canvas


def display_size(base: np.ndarray) -> np.ndarray:
    """Upscaled by a whole factor (nearest) until the short side reaches MIN_SIDE, shrunk (area) to MAX_SIDE."""
    height, width = base.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / min(height, width)))
    scale = max(1, min(scale, MAX_SIDE // max(height, width)))
    if scale > 1:
        return cv2.resize(base, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
    if max(height, width) > MAX_SIDE:
        factor = MAX_SIDE / max(height, width)
        return cv2.resize(base, (max(1, round(width * factor)), max(1, round(height * factor))),
                          interpolation=cv2.INTER_AREA)
    return base


def patch_boxes(coords: np.ndarray, side: int, dims: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """(K, 4) x0, y0, x1, y1 (exclusive) of each patch on an image of `shape` showing the whole slide."""
    sx, sy = shape[1] / dims[0], shape[0] / dims[1]
    boxes = np.stack([np.floor(coords[:, 0] * sx), np.floor(coords[:, 1] * sy),
                      np.ceil((coords[:, 0] + side) * sx), np.ceil((coords[:, 1] + side) * sy)], 1).astype(int)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    return np.clip(boxes, 0, [shape[1], shape[0], shape[1], shape[0]])


# ------------------------------------------------------------------------------------------ drawing
def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (JET, as the Grad-CAM overlays)."""
    scaled = (np.clip(values, 0.0, 1.0) * 255).astype(np.uint8).reshape(-1, 1)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).reshape(-1, 3)


def heat_overlay(base: np.ndarray, boxes: np.ndarray, attention: np.ndarray, top: list[int]) -> np.ndarray:
    """Each patch's box filled with its attention / the slide's max (JET, blended), the top patches outlined in
    white with their rank."""
    weights = attention / max(float(attention.max()), 1e-12)
    heat = np.full(base.shape[:2], -1.0, np.float32)
    for (x0, y0, x1, y1), w in zip(boxes, weights, strict=True):
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], w)
    covered = heat >= 0
    out = base.astype(np.float32)
    out[covered] = (1 - ALPHA) * out[covered] + ALPHA * jet(heat[covered]).astype(np.float32)
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    for rank, k in enumerate(top, 1):
        x0, y0, x1, y1 = (int(v) for v in boxes[k])
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
        cv2.putText(out, str(rank), (x0 + 2, min(y1 - 2, y0 + 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return out


def titled(tile: np.ndarray, title: str) -> np.ndarray:
    strip = np.full((TITLE, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, title, (3, TITLE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, tile], axis=0)


def hstack(tiles: list[np.ndarray]) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    parts: list[np.ndarray] = []
    for n, tile in enumerate(tiles):
        pad = np.full((height - tile.shape[0], tile.shape[1], 3), 255, np.uint8)
        parts += ([np.full((height, GAP, 3), 255, np.uint8)] if n else []) + [np.concatenate([tile, pad], 0)]
    return np.concatenate(parts, axis=1)


def vstack(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    parts: list[np.ndarray] = []
    for n, row in enumerate(rows):
        pad = np.full((row.shape[0], width - row.shape[1], 3), 255, np.uint8)
        parts += ([np.full((GAP, width, 3), 255, np.uint8)] if n else []) + [np.concatenate([row, pad], 1)]
    return np.concatenate(parts, axis=0)


def top_strip(patches: np.ndarray, attention: np.ndarray, top: list[int]) -> np.ndarray:
    """The top patches by attention, upscaled (nearest: what the model saw), each titled rank and weight."""
    tiles = [titled(cv2.resize(patches[k], (TOP_SIDE, TOP_SIDE), interpolation=cv2.INTER_NEAREST),
                    f"#{rank} {attention[k]:.3f}") for rank, k in enumerate(top, 1)]
    return hstack(tiles)


def bar_chart(contributions: list[dict[str, Any]], title: str, width: int = 460) -> np.ndarray:
    """Horizontal bars of the largest |contribution| features: green supports the prediction, red opposes."""
    rows = contributions[:BAR_ROWS]
    row_h, label_w, value_w = 18, 230, 60
    chart = np.full((TITLE + max(1, len(rows)) * row_h + 4, width, 3), 255, np.uint8)
    cv2.putText(chart, title, (3, TITLE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    if not rows:
        cv2.putText(chart, "no observed clinical features", (3, TITLE + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (90, 90, 90), 1, cv2.LINE_AA)
        return chart
    span = max(max(abs(r["contribution"]) for r in rows), 1e-9)
    half = (width - label_w - value_w) // 2
    axis = label_w + half
    for n, r in enumerate(rows):
        top = TITLE + n * row_h
        name = r["feature"] if len(r["feature"]) <= 34 else r["feature"][:33] + "~"
        cv2.putText(chart, name, (3, top + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
        length = round(abs(r["contribution"]) / span * (half - 2))
        value = r["contribution"]
        x0, x1 = (axis, axis + length) if value >= 0 else (axis - length, axis)
        if length > 0:
            cv2.rectangle(chart, (x0, top + 3), (x1, top + row_h - 4), POSITIVE if value >= 0 else NEGATIVE, -1)
        cv2.putText(chart, f"{value:+.3f}", (width - value_w + 2, top + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.36,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(chart, (axis, TITLE), (axis, chart.shape[0] - 3), (120, 120, 120), 1)
    return chart


# ------------------------------------------------------------------------------------------ explain
def load_thumbnail(store: ShardStore, slide: str) -> np.ndarray | None:
    path = store.root / "thumbnails" / f"{slide}.png"
    if not path.is_file():
        return None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def slide_infos(store: ShardStore) -> dict[str, Any]:
    path = store.root / RECORDS_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KdcliError(f"unreadable records file ({type(exc).__name__})", path=path,
                         hint="re-run `kdcli prepare`") from None


def top_patches(attention: np.ndarray, coords: np.ndarray, k: int) -> list[dict[str, Any]]:
    order = np.argsort(-attention, kind="stable")[:k]
    return [{"rank": rank, "position": int(i), "coords": [int(v) for v in coords[i]],
             "attention": round(float(attention[i]), 6)} for rank, i in enumerate(order, 1)]


def check_slide_checkpoint(meta: dict[str, Any], store: ShardStore, path: Path) -> None:
    if store.meta.task != meta.get("task") or "wsi" not in store.meta.modalities:
        raise KdcliError("checkpoint is a slide (MIL) model; this dataset has no slides", path=path,
                         hint="explain it on the slide dataset it was trained on")
    if meta["classes"] != store.meta.classes:
        raise KdcliError(f"checkpoint classes {meta['classes']} differ from the dataset's {store.meta.classes}",
                         path=path, hint="use a checkpoint trained on this dataset's label set")
    spec = meta["model"]
    if "mm" in spec["branches"]:
        dims = store.meta.targets.get("clinical", {}).get("shape", [0])[0]
        if dims != spec["clinical_dims"]:
            raise KdcliError(f"checkpoint takes {spec['clinical_dims']} clinical features, the dataset has {dims}",
                             path=path, hint="use the dataset the checkpoint was trained on")


def explain_slides(options: ExplainOptions) -> Path:
    from kdcli.data.bags import BagView
    from kdcli.mil import embeddings_path
    from kdcli.models.loading import load_model

    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    store = ShardStore(options.data)
    meta = checkpoint.meta
    check_slide_checkpoint(meta, store, checkpoint.path)
    if store.rows(options.split, "wsi").height == 0:
        raise KdcliError(f"no slides in split {options.split!r}", path=store.root, hint="explain another --split")
    view = BagView(store, options.split, embeddings=embeddings_path(store, meta["model"]), with_patches=True)
    picks = pick_indices(view.labels, options.count)
    device = select_device(options.device)
    model = load_model(checkpoint).to(device).eval()
    infos = slide_infos(store)
    features = list((store.meta.extra.get("clinical") or {}).get("features") or [])
    classes = store.meta.classes

    width = max(2, len(str(len(picks))))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, i in enumerate(picks):
        slide = view.records[i]
        shards, indices = view.members[i]
        item = view[i]
        patches = item["patches"].numpy().transpose(0, 2, 3, 1)
        if patches.shape[-1] != 3:
            patches = np.repeat(patches[..., :1], 3, axis=-1)
        coords = np.stack([store.read(s, int(k), "coords") for s, k in zip(shards, indices, strict=True)]) \
            if "coords" in store.meta.targets else np.zeros((len(patches), 2), np.int64)
        coords = coords.astype(np.int64)
        result = explain_bag(model, item, device)
        probs, branch = result["probs"], result["branch"]
        prediction, label = int(probs.argmax()), int(view.labels[i])
        info = infos.get(slide) or {}
        dims, side = slide_geometry(info, coords, patches.shape[1])
        thumb = load_thumbnail(store, slide)
        source = "thumbnail" if thumb is not None else "mosaic"
        base = display_size(thumb if thumb is not None else mosaic(patches, coords, dims, side))
        boxes = patch_boxes(coords, side, dims, base.shape)
        k = min(TOP_K, len(patches))
        order = [branch] + [b for b in result["attention"] if b != branch]
        maps = []
        for b in order:
            attention = result["attention"][b]
            top = [int(t) for t in np.argsort(-attention, kind="stable")[:k]]
            used = "used" if b == branch else "other branch"
            maps.append(titled(heat_overlay(base, boxes, attention, top), f"attention {b} ({used})"))
        used_attention = result["attention"][branch]
        top = [int(t) for t in np.argsort(-used_attention, kind="stable")[:k]]
        panels = [f"attention {b}" for b in order] + [f"top {k} patches ({branch})"]
        rows = [hstack(maps), titled(top_strip(patches, used_attention, top), panels[-1])]
        record: dict[str, Any] = {
            "file": f"{n + 1:0{width}d}_{safe_name(slide)}.png", "id": slide,
            "label": label, "label_name": classes[label], "prediction": prediction,
            "prediction_name": classes[prediction], "probability": round(float(probs[prediction]), 4),
            "probs": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
            "correct": label == prediction, "clinical_present": bool(item["clinical_present"]),
            "branch": branch, "patches": len(patches), "thumbnail": source,
            "dimensions": list(dims), "patch_level0": side,
            "top_patches": top_patches(used_attention, coords, k),
            "attention": {b: {"weights": [round(float(a), 6) for a in result["attention"][b]],
                              "top_patches": top_patches(result["attention"][b], coords, k)} for b in order},
            "coords": coords.tolist(), "panels": panels,
        }
        if result["contributions"] is not None:
            deltas = result["contributions"]
            values = item["clinical"].numpy()
            observed = [j for j in range(len(deltas)) if not np.isnan(deltas[j])]
            contributions = sorted(
                ({"feature": features[j] if j < len(features) else f"feature {j}", "index": j,
                  "value": round(float(values[j]), 4), "contribution": round(float(deltas[j]), 6)}
                 for j in observed), key=lambda r: (-abs(r["contribution"]), r["index"]))
            record["clinical_contributions"] = contributions
            panels.append("clinical occlusion")
            rows.append(bar_chart(contributions, f"clinical occlusion: P({classes[prediction]}) full - masked"))
        write_png(out / record["file"], vstack(rows))
        records.append(record)
    curves, curves_source = copy_curves(Path(options.checkpoint), out)
    report = {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "task": "mil", "modality": meta.get("modality"), "kind": meta.get("kind"), "method": meta.get("method"),
        "backbone": meta["model"].get("backbone"), "branches": meta["model"]["branches"], "classes": classes,
        "clinical_features": features if "mm" in meta["model"]["branches"] else [],
        "attention": "gated-attention weights over the slide's patches (sum 1 per branch); each patch's box on "
                     "the thumbnail coloured JET by weight / the slide's largest; top patches outlined in white",
        "occlusion": "observed clinical feature masked (value 0, indicator 0): predicted-class probability with "
                     "the full record minus with the feature masked; positive supports the prediction",
        "curves": curves, "curves_source": curves_source, "images": records,
    }
    return write_report(out, report, render_page(slides_page(report)))


# ------------------------------------------------------------------------------------------ html
STYLE = """.bar{display:inline-block;width:12em;height:.9em;vertical-align:middle;margin:0 .4em;border:1px solid #888;
background:linear-gradient(to right,#00007f,#0000ff,#00ffff,#7fff7f,#ffff00,#ff0000,#7f0000)}"""
MARKS = {True: '<span class="ok">&#10003; correct</span>', False: '<span class="bad">&#10007; wrong</span>'}


def figure_html(r: dict[str, Any]) -> str:
    esc = html.escape
    probs = " · ".join(f"{esc(c)} {p:.3f}" for c, p in r["probs"].items())
    caption = (f"<b>{esc(r['id'])}</b> &middot; true: {esc(r['label_name'])} &middot; predicted: "
               f"{esc(r['prediction_name'])} ({r['probability']:.2f}) {MARKS[r['correct']]}<br>"
               f"probabilities: {probs} &middot; {r['patches']} patches &middot; attention of branch "
               f"{esc(r['branch'])}{' (clinical record present)' if r['clinical_present'] else ''} "
               f"&middot; on the {esc(r['thumbnail'])}")
    contributions = r.get("clinical_contributions")
    if contributions:
        cells = "".join(f"<tr><td>{esc(c['feature'])}</td><td>{c['value']:g}</td><td>{c['contribution']:+.4f}</td>"
                        f"</tr>" for c in contributions[:5])
        caption += f"<table><tr><th>clinical feature</th><th>value</th><th>contribution</th></tr>{cells}</table>"
    return f'<figure><img src="{esc(r["file"])}" alt="{esc(r["id"])}"><figcaption>{caption}</figcaption></figure>'


def slides_page(report: dict[str, Any]) -> Page:
    esc = html.escape
    images = report["images"]
    right = sum(r["correct"] for r in images)
    about = (f"{report['modality']} · {report['kind']} ({report['method']}) · {report['backbone']} attention MIL, "
             f"branches {', '.join(report['branches'])} · {right}/{len(images)} slides correct")
    legend = (f'<p>attention: 0<span class="bar"></span>slide max &nbsp; {esc(report["attention"])}</p>\n'
              + (f"<p>clinical contributions: {esc(report['occlusion'])} (green supports, red opposes)</p>\n"
                 if report["clinical_features"] else ""))
    return Page(page_title(report), about, notes=[legend], curves=report["curves"],
                curves_source=report["curves_source"], samples=[figure_html(r) for r in images], style=STYLE)
