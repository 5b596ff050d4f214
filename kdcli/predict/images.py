"""`kdcli predict` for 2-D classifiers: fundus photos, OCT B-scans, chest X-rays, a lab's table modalities.

Each file goes through its source's own per-image function (`preprocess_image` of multieye and fundus-grading,
`preprocess_xray` of cxr, `preprocess_file` of table) with the options the checkpoint recorded, so the model sees
the very pixels `prepare` would have stored; the model then runs as in `kdcli evaluate` (uint8 batches, the same
autocast)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.errors import KdcliError, UsageError
from kdcli.predict.inputs import Failure, Item, image_items, progress


def image_reader(record: dict[str, Any], modality: str) -> Callable[[str], np.ndarray]:
    """The function `prepare` applies to one raw image of this checkpoint's data: path -> (size, size, C) uint8
    (the source's own, Source.raw_image_reader)."""
    reader = _source(record).raw_image_reader(record, modality)
    if reader is None:
        raise UsageError(f"predict cannot yet read raw files the way `prepare {record['source']}` does; evaluate "
                         "the checkpoint on prepared shards instead")
    return reader


def _source(record: dict[str, Any]) -> Any:
    from kdcli.sources import SOURCES

    return SOURCES.get(record["source"])


def one_line(exc: BaseException, path: str | None = None) -> str:
    """An exception as one line, without the hint on how `prepare` would skip it nor the file's name (the
    `failed PATH:` line names it)."""
    text = (" ".join(str(exc).split()) or type(exc).__name__).split(" — ")[0]
    return text.removeprefix(f"{path}: ") if path else text


class RawImages(torch.utils.data.Dataset):
    """Items -> (position, preprocessed image or None, error); runs in DataLoader workers."""

    def __init__(self, items: list[Item], reader: Callable[[str], np.ndarray]):
        self.items, self.reader = items, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, self.reader(self.items[i].files["image"]), ""
        except Exception as exc:  # noqa: BLE001  (decoders raise many types; each becomes one line for its file)
            return i, None, one_line(exc, self.items[i].files["image"])


def as_list(batch: list) -> list:
    return batch


def items_for(record: dict[str, Any], inputs: list[str]) -> tuple[list[Item], list[Failure]]:
    source = _source(record)
    return image_items(inputs, source.raw_suffixes, source.raw_kind)


def heads_of(meta: dict[str, Any]) -> list[tuple[str | None, list[str]]]:
    """(head, class names) of each output: a multi-head model's tasks, else its one head."""
    if meta.get("tasks"):
        return [(task, list(classes)) for task, classes in meta["tasks"].items()]
    return [(None, list(meta["classes"]))]


def result_row(item: Item, outputs: list[np.ndarray], heads: list[tuple[str | None, list[str]]],
               multilabel: bool, threshold: float) -> dict[str, Any]:
    row: dict[str, Any] = {"id": item.id, "path": item.path}
    for (head, classes), probs in zip(heads, outputs, strict=True):
        if multilabel:  # every finding with its probability, and those at or above the threshold
            row["findings"] = "|".join(c for c, p in zip(classes, probs, strict=True) if p >= threshold)
            row.update({f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)})
            continue
        suffix = f"_{head}" if head else ""
        predicted = int(probs.argmax())
        row[f"prediction{suffix}"] = predicted
        row[f"prediction_name{suffix}"] = classes[predicted]
        row.update({f"prob{suffix}_{c}": float(p) for c, p in zip(classes, probs, strict=True)})
    return row


def predict_images(checkpoint, record: dict[str, Any], options: Any, device: torch.device,
                   files: Path) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Image classifiers (one label, or one per finding): rows of probabilities; --explain: a CAM per input."""
    from kdcli.engine.device import amp_dtype
    from kdcli.models.loading import load_model

    inputs, batch_size, workers, strict = options.inputs, options.batch_size, options.workers, options.strict
    explain_dir, threshold = (files if options.explain else None), options.threshold
    meta = checkpoint.meta
    modality = meta["modality"]
    if modality not in record["modalities"]:
        raise KdcliError(f"checkpoint takes {modality!r}; its preprocessing record has "
                         f"{', '.join(record['modalities'])}", path=checkpoint.path)
    from kdcli.tasks import task_of

    multilabel = task_of(meta).activation == "sigmoid"
    heads = heads_of(meta)
    reader = image_reader(record, modality)
    items, failures = items_for(record, inputs)
    if strict and failures:
        raise KdcliError(failures[0].reason, path=failures[0].input)
    model = load_model(checkpoint).to(device).eval()
    dtype = amp_dtype(device)
    loader = torch.utils.data.DataLoader(RawImages(items, reader), batch_size=batch_size, num_workers=workers,
                                         collate_fn=as_list)
    rows: list[dict[str, Any]] = []
    bar = progress(len(items), "img")
    for batch in loader:
        bar.update(len(batch))
        good = []
        for position, image, error in batch:
            if error:
                if strict:
                    raise KdcliError(error, path=items[position].path)
                failures.append(Failure(items[position].path, error))
            else:
                good.append((position, image))
        if not good:
            continue
        images = torch.from_numpy(np.stack([image.transpose(2, 0, 1) for _, image in good]))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images.to(device))
        outputs = []
        for head, _ in heads:
            logits = (out["task_logits"][head] if head else out["logits"]).float()
            outputs.append((logits.sigmoid() if multilabel else logits.softmax(1)).cpu().numpy())
        batch_rows = [result_row(items[position], [o[n] for o in outputs], heads, multilabel, threshold)
                      for n, (position, _) in enumerate(good)]
        if explain_dir is not None:
            write_explanations(model, images, [items[p] for p, _ in good], outputs, heads, device, explain_dir,
                               batch_rows)
        rows += batch_rows
    bar.close()
    return rows, failures


def write_explanations(model, images: torch.Tensor, items: list[Item], outputs: list[np.ndarray],
                       heads: list[tuple[str | None, list[str]]], device: torch.device, folder: Path,
                       rows: list[dict[str, Any]]) -> None:
    """One PNG per image: the image and a Grad-CAM overlay per head, for that head's predicted class (multi-label:
    the most probable finding), as `kdcli explain` draws them."""
    from kdcli.explain.common import grad_cams, render_panel, safe_name, write_png

    cams = [grad_cams(model, images, [int(p.argmax()) for p in probs], device, len(images), head)
            for (head, _), probs in zip(heads, outputs, strict=True)]
    folder.mkdir(parents=True, exist_ok=True)
    for n, (item, row) in enumerate(zip(items, rows, strict=True)):
        path = folder / f"{safe_name(item.id)}.gradcam.png"
        write_png(path, render_panel(images[n].numpy(), [maps[n] for maps in cams]))
        row["explanation"] = str(path)
