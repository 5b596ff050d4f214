"""`kdcli evaluate` on a slide (MIL) checkpoint: slide-level AUC, accuracy and F1, and the missing-clinical
sweep: at each rate a seeded share of the test patients has its clinical record withheld (the same patients
for every model, nested as the rate grows) and is routed to the WSI-only path where the model has one; a
fusion-only model sees their record zero-filled.

A slide is scored as in training: cut into disjoint seeded bags of the checkpoint's training bag size (meta
"bag_size"; 16 for checkpoints that predate it), its probability the mean over its bags (`kdcli.mil.predict_bags`);
--bag-size 0 pools every patch at once, as evaluation did before issue 13."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.errors import UsageError
from kdcli.metrics.classification import classification_metrics
from kdcli.shards.reader import ShardStore
from kdcli.sources.splits import stable_seed


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--missing-rate {text!r}: comma-separated fractions, e.g. 0,0.2,0.4,0.6,0.8") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise UsageError(f"--missing-rate {text!r}: fractions between 0 and 1")
    return rates


def hidden_slides(records: list[str], rate: float, seed: int = 0) -> set[str]:
    """The first round(rate * n) slides of one seeded order: a higher rate hides a superset."""
    order = np.random.default_rng(stable_seed("missing-clinical", seed)).permutation(len(records))
    return {records[i] for i in order[: int(round(rate * len(records)))]}


def evaluate_slide_checkpoint(options: Any) -> dict[str, Any]:
    """`kdcli evaluate` on a slide checkpoint (EvaluateOptions; the task's evaluator, tasks/)."""
    return evaluate_slides(options.checkpoint, options.data, options.split, options.missing_rate, options.device,
                           bag_size=options.bag_size)


def evaluate_slides(checkpoint_path: Path, data: Path, split: str = "test", rates: str | None = None,
                    device_name: str = "auto", seed: int = 0, bag_size: int | None = None) -> dict[str, Any]:
    from kdcli.data.bags import BagView
    from kdcli.engine.device import select_device
    from kdcli.mil import BAG_SIZE, embeddings_path, predict_bags
    from kdcli.models.loading import load_model

    checkpoint = load_checkpoint(Path(checkpoint_path))
    store = ShardStore(data)
    store.verify(split)  # the split scored is re-hashed from its bytes
    if checkpoint.meta["classes"] != store.meta.classes:
        raise UsageError(f"checkpoint classes {checkpoint.meta['classes']} differ from the dataset's "
                         f"{store.meta.classes}")
    if bag_size is not None and bag_size < 0:
        raise UsageError(f"--bag-size {bag_size}: patches per evaluation bag, or 0 for the whole slide")
    bag_size = checkpoint.meta.get("bag_size", BAG_SIZE) if bag_size is None else bag_size
    device = select_device(device_name)
    model = load_model(checkpoint).to(device)
    embeddings = embeddings_path(store, checkpoint.meta["model"])
    records = BagView(store, split, embeddings=embeddings).records

    def run(rate: float) -> dict[str, Any]:
        view = BagView(store, split, hide_clinical=hidden_slides(records, rate, seed), embeddings=embeddings)
        predicted = predict_bags(model, view, device, bag_size=bag_size)
        metrics = classification_metrics(predicted["labels"], predicted["probs"], store.meta.classes)
        return {k: metrics[k] for k in ("auc", "accuracy", "macro_f1", "n")} | {"hidden": len(view.hide_clinical)}

    report: dict[str, Any] = {"checkpoint": str(checkpoint_path), "data": str(data), "split": split, "task": "mil",
                              "modality": checkpoint.meta["modality"], "method": checkpoint.meta["method"],
                              "branches": checkpoint.meta["model"]["branches"], "bag_size": bag_size}
    if rates is None:
        view = BagView(store, split, embeddings=embeddings)
        predicted = predict_bags(model, view, device, bag_size=bag_size)
        report["metrics"] = classification_metrics(predicted["labels"], predicted["probs"], store.meta.classes)
        return report
    report["missing_rates"] = parse_rates(rates)
    report["metrics"] = {f"{rate:g}": run(rate) for rate in report["missing_rates"]}
    return report
