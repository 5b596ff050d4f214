"""`kdcli explain` on a segmentation checkpoint: for a few tumour slices of one split, one PNG row of the input
sequence(s), the ground truth and the prediction as overlays, the whole-tumour error map and the prototype
similarity maps of the model's last decoder features (ProtoKD's M_k, from the slice's ground-truth prototypes);
for a ProtoKD student whose teacher checkpoint is still at hand, the teacher's maps beside them (the maps
the prototype loss matches). Written as PNGs, explain.json and a self-contained index.html that is written last.

Slices are picked deterministically and spread over cases: each case's largest-tumour slice first (cases in
id order), then each case's next largest, and so on."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kdcli.data.slices import SliceView
from kdcli.engine.checkpoint import file_sha256, load_checkpoint
from kdcli.engine.device import select_device
from kdcli.errors import KdcliError
from kdcli.explain.common import GAP, MIN_SIDE, ExplainOptions, check_options, safe_name, write_png, write_report
from kdcli.explain.page import Page, copy_curves, page_title, render_page
from kdcli.methods.protokd import similarity_maps
from kdcli.metrics.segmentation import DEFAULT_REGIONS, region_metrics
from kdcli.segmentation import check_segmentation_checkpoint, load_unet
from kdcli.shards.reader import ShardStore

# RGB per label index: necrotic core red, oedema green, enhancing tumour yellow (BraTS viewers' convention)
LABEL_COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (250, 230, 30)}
ERROR_COLOURS = {"true positive": (235, 235, 235), "false positive": (255, 0, 255), "false negative": (0, 220, 255)}
SHORT = {0: "BG", 1: "NCR", 2: "ED", 3: "ET"}
ALPHA = 0.5
TITLE = 18  # px strip above each tile with its name


# ------------------------------------------------------------------------------------------ picking
def tumour_areas(view: SliceView) -> np.ndarray:
    """Tumour pixels of each slice (0 without reading the mask where the slice is labelled tumour-free)."""
    areas = np.zeros(len(view), np.int64)
    for i in np.flatnonzero(view.labels == 1):
        mask = view.store.read(view.shards[i], int(view.indices[i]), view.target)[..., 0]
        areas[i] = int(np.count_nonzero(mask))
    return areas


def pick_slices(records: list[str], positions: np.ndarray, areas: np.ndarray, count: int) -> list[int]:
    """Round-robin over cases (id order): each case's largest-tumour slice first, then its next largest...;
    ties go to the lower slice position. Only slices with tumour."""
    by_case: dict[str, list[int]] = {}
    for i in np.flatnonzero(areas > 0):
        by_case.setdefault(records[i], []).append(int(i))
    ranked = [sorted(members, key=lambda i: (-int(areas[i]), int(positions[i]))) for _, members in
              sorted(by_case.items())]
    picks: list[int] = []
    for rank in range(max((len(m) for m in ranked), default=0)):
        for members in ranked:
            if rank < len(members):
                picks.append(members[rank])
            if len(picks) == count:
                return picks
    return picks


# ------------------------------------------------------------------------------------------ drawing
def grey(plane: np.ndarray) -> np.ndarray:
    """A z-scored plane as HWC uint8 grey, stretched between its 1st and 99th percentile."""
    lo, hi = np.percentile(plane, [1, 99])
    scaled = np.clip((plane - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=2)


def paint(base: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    out = base.astype(np.float32)
    for mask, colour in masks:
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.array(colour, np.float32)
    return out.round().astype(np.uint8)


def label_overlay(base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return paint(base, [(labels == k, colour) for k, colour in LABEL_COLOURS.items()])


def error_overlay(base: np.ndarray, pred: np.ndarray, truth: np.ndarray, region: list[int]) -> np.ndarray:
    p, t = np.isin(pred, region), np.isin(truth, region)
    return paint(base, [(p & t, ERROR_COLOURS["true positive"]), (p & ~t, ERROR_COLOURS["false positive"]),
                        (~p & t, ERROR_COLOURS["false negative"])])


def heat(similarity: np.ndarray, size: tuple[int, int], outline: np.ndarray) -> np.ndarray:
    """Cosine similarity in [-1, 1] as a JET map (blue -1, red +1), bilinear to `size`, with the class's
    ground-truth outline in white."""
    big = cv2.resize(similarity.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    scaled = (np.clip((big + 1.0) / 2.0, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    contours, _ = cv2.findContours(outline.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.ascontiguousarray(rgb), contours, -1, (255, 255, 255), 1)


def titled(tile: np.ndarray, title: str) -> np.ndarray:
    strip = np.full((TITLE, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, title, (3, TITLE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, tile], axis=0)


def render_row(tiles: list[tuple[str, np.ndarray]]) -> np.ndarray:
    height = tiles[0][1].shape[0] + TITLE
    gap = np.full((height, GAP, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for n, (title, tile) in enumerate(tiles):
        parts += ([gap] if n else []) + [titled(tile, title)]
    return np.concatenate(parts, axis=1)


def base_sequence(modalities: list[str]) -> int:
    """The sequence the overlays are drawn on: FLAIR shows the oedema, else T1ce, else the first."""
    for name in ("flair", "t1ce"):
        if name in modalities:
            return modalities.index(name)
    return 0


def slice_tiles(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, modalities: list[str],
                maps: dict[str, np.ndarray], classes: list[int], region: list[int]) -> list[tuple[str, np.ndarray]]:
    """Upscaled tiles of one slice: nearest for pixels and labels, bilinear for the similarity maps."""
    height, width = truth.shape
    scale = max(1, math.ceil(MIN_SIDE / min(height, width)))
    size = (width * scale, height * scale)

    def up(array: np.ndarray) -> np.ndarray:
        return cv2.resize(array, size, interpolation=cv2.INTER_NEAREST)

    planes = [up(grey(plane)) for plane in image]
    big_truth, big_pred = up(truth.astype(np.uint8)), up(pred.astype(np.uint8))
    base = planes[base_sequence(modalities)]
    tiles = [(name, plane) for name, plane in zip(modalities, planes, strict=True)]
    tiles += [("truth", label_overlay(base, big_truth)), ("prediction", label_overlay(base, big_pred)),
              ("error (WT)", error_overlay(base, big_pred, big_truth, region))]
    for who, similarity in maps.items():
        tiles += [(f"{who} {SHORT.get(c, str(c))}", heat(similarity[k], size, big_truth == c))
                  for k, c in enumerate(classes)]
    return tiles


# ------------------------------------------------------------------------------------------ models
def forward(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(images.to(device))
    return out["features"].float().cpu(), out["logits"].float().cpu()


def load_teacher(meta: dict[str, Any], store: ShardStore) -> tuple[Any, list[str] | None, str]:
    """(teacher U-Net, its sequences, note) for a ProtoKD student whose teacher still loads; (None, None, why)
    otherwise."""
    info = meta.get("teacher") or {}
    if meta.get("kind") != "student" or meta.get("method") != "protokd" or not info.get("path"):
        return None, None, "not a ProtoKD student: no teacher prototype maps"
    path = Path(info["path"])
    try:
        checkpoint = load_checkpoint(path)
        modalities = check_segmentation_checkpoint(checkpoint, store)
        teacher = load_unet(checkpoint)
    except (KdcliError, OSError, KeyError, RuntimeError) as exc:
        return None, None, f"teacher maps skipped: {exc}"
    note = f"teacher maps from {path}"
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        note += " (the file changed since distillation: these may not be the maps the loss matched)"
    return teacher, modalities, note


# ------------------------------------------------------------------------------------------ explain
def explain_segmentation(options: ExplainOptions) -> Path:
    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    store = ShardStore(options.data)
    modalities = check_segmentation_checkpoint(checkpoint, store)
    meta = checkpoint.meta
    regions = meta.get("regions") or store.meta.extra.get("regions") or DEFAULT_REGIONS
    teacher, teacher_modalities, teacher_note = load_teacher(meta, store)
    view = SliceView(store, options.split, modalities, teacher_modalities)
    picks = pick_slices(view.records, view.positions, tumour_areas(view), options.count)
    if not picks:
        raise KdcliError(f"no slices with tumour in split {options.split!r} ({len(view)} slices)", path=store.root,
                         hint="explain another --split, or prepare with more cases")

    items = [view[i] for i in picks]
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"] for item in items])
    device = select_device(options.device)
    model = load_unet(checkpoint).to(device)
    features, logits = forward(model, images, device)
    preds = logits.argmax(1).numpy()
    teacher_features = None
    if teacher is not None:
        teacher_features, _ = forward(teacher.to(device), torch.stack([item["teacher_image"] for item in items]),
                                      device)

    wt = regions.get("wt") or sorted({c for labels in regions.values() for c in labels})
    width = max(2, len(str(len(picks))))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, i in enumerate(picks):
        truth = masks[n].numpy()
        classes = [int(c) for c in np.unique(truth)]  # ProtoKD's prototypes: every class the slice has
        count = max(classes) + 1  # maps for classes 0..count-1; the slice's own are picked out
        mask = masks[n:n + 1]
        maps = {"student" if teacher is not None else "model":
                similarity_maps(features[n:n + 1], mask, count)[0, classes].numpy()}
        if teacher_features is not None:
            maps["teacher"] = similarity_maps(teacher_features[n:n + 1], mask, count)[0, classes].numpy()
        tiles = slice_tiles(images[n].numpy(), truth, preds[n], modalities, maps, classes, wt)
        case, position = view.records[i], int(view.positions[i])
        file = f"{n + 1:0{width}d}_{safe_name(case)}_z{position:03d}.png"
        write_png(out / file, render_row(tiles))
        records.append({
            "file": file, "id": view.ids[i], "case": case, "slice": position,
            "tumour_pixels": int(np.isin(truth, wt).sum()),
            "dice": {k.removeprefix("dice_"): round(v, 4)
                     for k, v in region_metrics(preds[n], truth, regions, with_hd95=False).items()},
            "prototype_classes": [store.meta.classes[c] for c in classes],
            "prototype_maps": list(maps), "tiles": [title for title, _ in tiles],
        })
    curves, curves_source = copy_curves(Path(options.checkpoint), out)
    report = {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "task": "segmentation", "modality": ",".join(modalities), "kind": meta.get("kind"),
        "method": meta.get("method"), "backbone": meta["model"].get("backbone"), "classes": store.meta.classes,
        "regions": regions, "overlay_sequence": modalities[base_sequence(modalities)],
        "teacher": {"maps": teacher is not None, "modality": ",".join(teacher_modalities or []) or None,
                    "note": teacher_note},
        "colours": {store.meta.classes[k]: list(v) for k, v in LABEL_COLOURS.items() if k < len(store.meta.classes)},
        "error_colours": {k: list(v) for k, v in ERROR_COLOURS.items()},
        "similarity": "cosine between each pixel's last decoder features and the slice's ground-truth prototype "
                      "of the class (mean feature over its pixels); colormap JET from -1 (blue) to +1 (red), "
                      "white outline: the class's ground truth",
        "curves": curves, "curves_source": curves_source, "images": records,
    }
    return write_report(out, report, render_page(segmentation_page(report)))


# ------------------------------------------------------------------------------------------ html
STYLE = """.legend span.sw{display:inline-block;width:1em;height:1em;
vertical-align:middle;margin:0 .3em 0 .9em;border:1px solid #888}
.bar{display:inline-block;width:12em;height:.9em;vertical-align:middle;margin:0 .4em;border:1px solid #888;
background:linear-gradient(to right,#00007f,#0000ff,#00ffff,#7fff7f,#ffff00,#ff0000,#7f0000)}"""


def swatch(name: str, rgb: list[int]) -> str:
    return f'<span class="sw" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]})"></span>{html.escape(name)}'


def figure_html(r: dict[str, Any]) -> str:
    esc = html.escape
    dice = "".join(f"<td>{esc(k.upper())} {v:.3f}</td>" for k, v in r["dice"].items())
    caption = (f"<b>{esc(r['case'])}</b>, slice {r['slice']} &middot; {r['tumour_pixels']} tumour px"
               f"<table><tr><th>Dice</th>{dice}</tr></table>"
               f"left to right: {esc(', '.join(r['tiles']))}")
    return f'<figure><img src="{esc(r["file"])}" alt="{esc(r["id"])}"><figcaption>{caption}</figcaption></figure>'


def segmentation_page(report: dict[str, Any]) -> Page:
    esc = html.escape
    images = report["images"]
    means = " · ".join(f"{k.upper()} {np.mean([r['dice'][k] for r in images]):.3f}" for k in images[0]["dice"])
    about = (f"{report['modality']} · {report['kind']} ({report['method']}) · {report['backbone']} U-Net · "
             f"{len(images)} tumour slices · mean slice Dice {means} · overlays on {report['overlay_sequence']}")
    legend = ('<p class="legend">labels:' + "".join(swatch(k, v) for k, v in report["colours"].items())
              + " &nbsp; error (WT):" + "".join(swatch(k, v) for k, v in report["error_colours"].items())
              + f'</p>\n<p class="legend">prototype similarity: -1<span class="bar"></span>+1 &nbsp; '
              f"{esc(report['similarity'])}</p>\n")
    teacher = report["teacher"]
    note = f'<p class="note">{esc(teacher["note"])}</p>\n' if teacher["maps"] else f"<p>{esc(teacher['note'])}</p>\n"
    return Page(page_title(report), about, notes=[legend, note], curves=report["curves"],
                curves_source=report["curves_source"], samples=[figure_html(r) for r in images], style=STYLE)
