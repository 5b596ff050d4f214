"""The training-curve PNG beside every checkpoint (<out>.curves.png): the loss of each term per epoch, the dev
metric the best epoch is chosen by (and the other dev scores), and a line at the selected epoch.

Drawn from <out>.metrics.jsonl, so a resumed run's figure shows every epoch, not only those since the resume;
written under a temporary name and renamed (kdcli.storage.save_figure), so it is never half a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import sibling

NOT_TERMS = {"train_samples_per_s"}  # per-epoch numbers in the train_ columns that are no loss
DEV_SCORES = ("accuracy", "macro_f1", "kappa", "auc", "mean_auroc", "dice_mean")  # drawn beside the selection one


def curves_path(out: Path) -> Path:
    return sibling(Path(out), ".curves.png")


def read_rows(jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["epoch"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [epoch for epoch, _ in points], [float(value) for _, value in points]


def loss_terms(rows: list[dict[str, Any]], diagnostics: tuple[str, ...] = ()) -> list[str]:
    """train_<term> columns that hold losses: the summed total first, then each term. `diagnostics`: the
    method's '_x' terms (a gate's opening rate, counts; logged as train_x), which are no losses."""
    skip = NOT_TERMS | {f"train_{name.lstrip('_')}" for name in diagnostics}
    keys = list(dict.fromkeys(k for row in rows for k in row if k.startswith("train_") and k not in skip))
    return (["train_loss"] if "train_loss" in keys else []) + [k for k in keys if k != "train_loss"]


def selected_epoch(rows: list[dict[str, Any]], metric: str) -> int:
    """The epoch the engine kept as <out>.pt: the first with the highest dev metric (it saves on a strict gain);
    -1 when no epoch has the metric."""
    epochs, values = series(rows, f"dev_{metric}")
    return epochs[values.index(max(values))] if values else -1


def write_curves(out: Path, metric: str, title: str = "", diagnostics: tuple[str, ...] = ()) -> Path | None:
    """Draw <out>.metrics.jsonl into <out>.curves.png; None when there is no epoch to draw yet."""
    jsonl = sibling(Path(out), ".metrics.jsonl")
    if not jsonl.is_file():
        return None
    rows = read_rows(jsonl)
    if not rows:
        return None
    best_epoch = selected_epoch(rows, metric)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from kdcli.storage import save_figure

    fig, (losses, scores) = plt.subplots(1, 2, figsize=(10, 3.6))
    terms = loss_terms(rows, diagnostics)
    if len(terms) == 2:  # one term: the total is that term, drawn once
        terms = terms[1:]
    for key in terms:
        epochs, values = series(rows, key)
        losses.plot(epochs, values, marker=".", label=key.removeprefix("train_"),
                    linewidth=2.2 if key == "train_loss" else 1.2)
    losses.set_xlabel("epoch")
    losses.set_ylabel("training loss (per term)")
    losses.legend(fontsize=7)
    selection = f"dev_{metric}"
    epochs, values = series(rows, selection)
    scores.plot(epochs, values, marker=".", linewidth=2.2, label=f"{metric} (selects)")
    for name in DEV_SCORES:
        if name != metric:
            other_epochs, other = series(rows, f"dev_{name}")
            if other:
                scores.plot(other_epochs, other, linewidth=1, alpha=0.7, label=name)
    scores.set_xlabel("epoch")
    scores.set_ylabel("dev score")
    scores.legend(fontsize=7)
    for axis in (losses, scores):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch > 0:
            axis.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    if best_epoch > 0 and best_epoch in epochs:
        best = values[epochs.index(best_epoch)]
        late = best_epoch > (epochs[0] + epochs[-1]) / 2  # label on the side with room, inside the axes
        scores.annotate(f"selected: epoch {best_epoch}\n{metric} {best:.3f}", (best_epoch, best), fontsize=7,
                        xytext=(-6 if late else 6, -24), textcoords="offset points", ha="right" if late else "left")
    fig.suptitle(title or Path(out).name, fontsize=9)
    fig.tight_layout()
    path = curves_path(out)
    save_figure(fig, path)
    return path
