"""`kdcli predict` for slide (MIL) checkpoints: a slide-level score and an attention heat map per slide.

The slide goes through `prepare camelyon`'s own reader (kdcli.sources.camelyon) with the options the checkpoint
recorded: tissue mask on a thumbnail, the patch grid at the recorded magnification, the seeded spread sample of
at most max_patches (seeded by the slide's id, its file stem, so the same patches as in the shards), each patch
resized to the stored side; a tumour outline `<slide>.json` beside the slide is read as prepare reads it. The
slide is then scored as `kdcli evaluate` scores it: disjoint bags of the training bag size, the mean over bags.

With `--clinical SHEET` (a CSV/XLSX in the layout `prepare camelyon` reads) each slide's row, matched on the
slide's id as prepare matches it, is encoded by the source's own functions with the encoding the checkpoint
recorded (vocabularies, train statistics; kdcli.sources.camelyon.ClinicalSheet) and fed as evaluate feeds a
present record: fusion models (`teach --modality wsi,clinical`) and bidirectional students then use it. A slide
without a row goes the WSI-only route where the model has one, else it is one failure line. Without --clinical
a model with a WSI-only head (`teach --modality wsi`, bidirectional students) answers from the slide alone and a
fusion-only model is refused, as are models on cached patch embeddings (with or without --clinical)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.errors import KdcliError, UsageError
from kdcli.predict.images import one_line
from kdcli.predict.inputs import Failure, Item, progress, slide_items

HEAT_SIDE = 1024  # the thumbnail's longer side under the heat map, in pixels


class OneSlide:
    """The view `kdcli.mil.predict_bags` iterates, holding one slide's bag."""

    def __init__(self, slide_id: str, item: dict[str, Any]):
        self.records, self.item = [slide_id], item

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.item)


def check_slide_model(meta: dict[str, Any], path: Path, clinical: Path | None) -> None:
    spec = meta["model"]
    if spec.get("embeddings"):
        raise UsageError(f"{path}: the model reads patch embeddings cached by `kdcli embed`, not pixels; predict "
                         "needs a slide model with its own patch encoder (teach without --embeddings)")
    if clinical is not None and "mm" not in spec["branches"]:
        raise UsageError(f"{path}: the model reads slides only (no clinical branch); drop --clinical")
    if clinical is None and "sm" not in spec["branches"]:
        raise UsageError(f"{path}: the model fuses each slide with its clinical record and has no WSI-only head; "
                         "pass --clinical SHEET with the slides' rows (the sheet layout `prepare camelyon` reads)")


def clinical_sheet(checkpoint, record: dict[str, Any], options: Any):
    """The --clinical sheet, read with the encoding the checkpoint recorded (None without --clinical)."""
    from kdcli.sources.camelyon import ClinicalSheet

    if options.clinical is None:
        return None
    encoding = record.get("clinical") or recorded_encoding(checkpoint, options.data)
    dims = int(checkpoint.meta["model"]["clinical_dims"])
    if len(encoding["features"]) != dims:
        raise KdcliError(f"the recorded clinical encoding has {len(encoding['features'])} features, the model "
                         f"reads {dims}", path=checkpoint.path, hint="pass --data with the shards it was trained on")
    return ClinicalSheet(Path(options.clinical), encoding)


def recorded_encoding(checkpoint, data: Path | None) -> dict[str, Any]:
    """For a checkpoint whose preprocessing record predates the clinical encoding: its dataset's (dataset.json
    extra.clinical), from the recorded shards or --data."""
    from kdcli.predict.contract import checkpoint_preprocessing

    try:
        rebuilt = checkpoint_preprocessing({**checkpoint.meta, "preprocess": None}, checkpoint.path, data)
    except KdcliError:
        raise KdcliError("the checkpoint's preprocessing record predates the clinical encoding, and the dataset "
                         "it was trained on is gone or changed", path=checkpoint.path,
                         hint="pass --data with the shard directory it was trained on") from None
    if not rebuilt.get("clinical"):
        raise KdcliError("the dataset has no clinical encoding in dataset.json", path=data or checkpoint.path,
                         hint="prepare it again with this kdcli (prepare camelyon records the encoding)")
    return rebuilt["clinical"]


def clinical_fields(sheet, item: Item, dims: int, wsi_head: bool) -> dict[str, Any]:
    """The bag's clinical entries: the slide's encoded row as the shards hold it (float16, read back as BagView
    reads it), or none (clinical_present False: the WSI-only route) when no sheet is given or it has no row."""
    encoded = sheet.encode(item.id) if sheet is not None else None
    if encoded is None:
        if sheet is not None and not wsi_head:
            raise KdcliError(f"{sheet.path} has no row for slide {item.id} (matched on {sheet.id_column!r}) and "
                             "the model has no WSI-only head")
        return {"clinical": torch.zeros(dims), "clinical_mask": torch.zeros(dims), "clinical_present": False}
    vector, mask = encoded
    observed = np.asarray(mask, np.uint8).astype(np.float32)
    values = np.nan_to_num(np.asarray(vector, np.float16).astype(np.float32)) * observed
    return {"clinical": torch.from_numpy(values), "clinical_mask": torch.from_numpy(observed),
            "clinical_present": True}


def read_patches(item: Item, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(patches (K, H, W, 3) uint8, level-0 coords (K, 2), the reader's info) exactly as prepare stores them."""
    from kdcli.sources.camelyon import CamelyonSource, SlideRecord

    options = dict(record.get("options") or {})
    outline = Path(item.path).with_suffix(".json")
    slide = SlideRecord(id=item.id, group=item.id, split="test", label=0, files={"wsi": item.path},
                        outline=str(outline) if outline.is_file() else "")
    info, samples = CamelyonSource(**options).read(slide, int(record["size"]))
    patches, coords = [], []
    for sample in samples:
        patches.append(sample.arrays["wsi"])
        coords.append(sample.arrays["coords"])
    return np.stack(patches), np.stack(coords).astype(np.int64), info


def predict_slides(checkpoint, record: dict[str, Any], options: Any, device: torch.device,
                   folder: Path) -> tuple[list[dict[str, Any]], list[Failure]]:
    from kdcli.mil import BAG_SIZE, predict_bags
    from kdcli.models.loading import load_model

    inputs, strict = options.inputs, options.strict
    meta = checkpoint.meta
    check_slide_model(meta, checkpoint.path, options.clinical)
    sheet = clinical_sheet(checkpoint, record, options)
    wsi_head = "sm" in meta["model"]["branches"]
    classes = list(meta["classes"])
    dims = int(meta["model"].get("clinical_dims") or 1)
    bag_size = int(meta.get("bag_size", BAG_SIZE))
    items, failures = slide_items(inputs)
    if strict and failures:
        raise KdcliError(failures[0].reason, path=failures[0].input)
    from kdcli.sources.camelyon import JPEG_SUFFIXES, openslide_module

    if any(Path(item.path).suffix.lower() not in JPEG_SUFFIXES for item in items):
        openslide_module()  # one line for the missing package, not one per slide
    model = load_model(checkpoint).to(device).eval()
    rows = []
    bar = progress(len(items), "slide")
    for item in items:
        bar.update(1)
        try:
            clinical = clinical_fields(sheet, item, dims, wsi_head)  # a bad row fails before the slide is read
            patches, coords, info = read_patches(item, record)
            bag = {"patches": torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2))),
                   "bag_mask": torch.ones(len(patches), dtype=torch.bool), **clinical,
                   "label": 0, "index": 0, "teacher_index": 0}
            result = predict_bags(model, OneSlide(item.id, bag), device, keep_attention=True, bag_size=bag_size)
            heat = write_heat_map(folder, item, record, patches, coords, info, result["attention"][0])
        except Exception as exc:  # noqa: BLE001  (OpenSlide and decoders raise many types; one line per slide)
            if strict:
                raise KdcliError(one_line(exc, item.path), path=item.path) from None
            failures.append(Failure(item.path, one_line(exc, item.path)))
            continue
        probs = result["probs"][0]
        predicted = int(probs.argmax())
        rows.append({"id": item.id, "path": item.path, "prediction": predicted, "prediction_name": classes[predicted],
                     **{f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
                     "patches": len(patches), "clinical_used": bool(clinical["clinical_present"]),
                     "heatmap": str(heat)})
    bar.close()
    return rows, failures


def write_heat_map(folder: Path, item: Item, record: dict[str, Any], patches: np.ndarray, coords: np.ndarray,
                   info: dict[str, Any], attention: np.ndarray) -> Path:
    """The slide's thumbnail with each patch coloured by its attention (JET, / the slide's largest) and the top
    patches outlined and ranked, as `kdcli explain` draws slides; the patches' mosaic if no thumbnail reads."""
    from kdcli.explain.common import safe_name, write_png
    from kdcli.explain.slides import TOP_K, display_size, heat_overlay, mosaic, patch_boxes

    dims = (int(info["dimensions"][0]), int(info["dimensions"][1]))
    side = int(info["patch_level0"])
    try:
        from kdcli.sources.camelyon import JPEG_SUFFIXES, _Slide

        jpeg = Path(item.path).suffix.lower() in JPEG_SUFFIXES
        native = (record.get("options") or {}).get("native_mag") or ((record.get("options") or {}).get("mag", 20.0)
                                                                      if jpeg else None)
        slide = _Slide(item.id, item.path, native)
        try:
            base, _ = slide.thumbnail(max(1.0, max(dims) / HEAT_SIDE))
        finally:
            slide.close()
    except Exception:  # noqa: BLE001  (a picture only: the patches already read make one)
        base = mosaic(patches, coords, dims, side)
    base = display_size(base)
    top = [int(t) for t in np.argsort(-attention, kind="stable")[:min(TOP_K, len(attention))]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(item.id)}.attention.png"
    write_png(path, heat_overlay(base, patch_boxes(coords, side, dims, base.shape), attention, top))
    return path
