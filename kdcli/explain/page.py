"""The one HTML page writer of every `kdcli explain` variant (classification, multi-label gaze, segmentation,
slides): title, a line about the run, warnings, the variant's legends, a metrics section, the run's figures
(the training curves copied beside the page) and the per-sample figures. The variants build a Page; how a page
looks is decided here, once.

The page is self-contained: every image it shows is a file in the report folder, linked by a relative name."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.engine.curves import curves_path
from kdcli.shards.format import atomic_write_bytes

CURVES_FILE = "curves.png"  # the training curves, copied from <checkpoint>.curves.png into the report folder
BASE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
figure{margin:0 0 1.6em 0}img{max-width:100%;border:1px solid #ccc}
.ok{color:#1a7f37}.bad{color:#c62828}.note{background:#fff4d6;padding:.5em}.warning{background:#ffe0e0;padding:.5em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:0 .7em 0 0;text-align:left}
table.confusion td,table.confusion th{padding:.15em .5em;text-align:right;border:1px solid #ddd}"""
GRID_STYLE = """.grid{display:flex;flex-wrap:wrap;gap:1.2em}.grid figure{margin:0;max-width:420px}
.grid figure.wide{max-width:640px}"""


@dataclass
class Page:
    title: str
    about: str  # plain text: one line on the model and the run
    warnings: list[str] = field(default_factory=list)  # plain text: results that mean nothing, said at the top
    notes: list[str] = field(default_factory=list)  # HTML blocks: the variant's legends and notes
    metrics: str = ""  # HTML: the variant's metrics tables, under metrics_heading
    metrics_heading: str = "Metrics"
    curves: str | None = None  # the training-curve file in the report folder, or None when there is none
    curves_source: str = ""  # where the curves came from (or would have): <checkpoint>.curves.png
    samples: list[str] = field(default_factory=list)  # HTML: one <figure> per explained sample
    samples_heading: str = ""  # a heading above the samples ("" for none)
    grid: bool = False  # samples side by side (small panels) rather than one per row
    style: str = ""  # the variant's own CSS (swatches, colour bars)


def copy_curves(checkpoint: Path, out: Path) -> tuple[str | None, str]:
    """Copy <checkpoint>.curves.png into the report folder (so the page does not point outside itself):
    (its name there or None when training drew none, the source path)."""
    source = curves_path(Path(checkpoint))
    if not source.is_file():
        return None, str(source)
    atomic_write_bytes(Path(out) / CURVES_FILE, source.read_bytes())
    return CURVES_FILE, str(source)


def curves_html(page: Page) -> str:
    esc = html.escape
    if page.curves is None:  # one line, not a broken image
        return f"<p>No training curves beside this checkpoint ({esc(page.curves_source)} does not exist).</p>\n"
    return (f'<figure><img src="{esc(page.curves)}" alt="training curves"><figcaption>training curves: loss per '
            f"term, dev scores and the selected epoch (from {esc(page.curves_source)})</figcaption></figure>\n")


def render_page(page: Page) -> str:
    esc = html.escape
    warnings = "".join(f'<p class="warning">warning: {esc(line)}</p>\n' for line in page.warnings)
    metrics = f"<h2>{esc(page.metrics_heading)}</h2>\n{page.metrics}" if page.metrics else ""
    heading = f"<h2>{esc(page.samples_heading)}</h2>\n" if page.samples_heading else ""
    samples = "\n".join(page.samples)
    if page.grid:
        samples = f'<div class="grid">\n{samples}\n</div>'
    style = "\n".join(s for s in (BASE_STYLE, GRID_STYLE if page.grid else "", page.style) if s)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(page.title)}</title>"
            f"<style>{style}</style></head><body>\n<h1>{esc(page.title)}</h1>\n<p>{esc(page.about)}</p>\n"
            f"{warnings}{''.join(page.notes)}{metrics}<h2>Training</h2>\n{curves_html(page)}{heading}"
            f"{samples}\n</body></html>\n")


def page_title(report: dict[str, Any]) -> str:
    return f"kdcli explain: {Path(report['checkpoint']).name} on {report['split']}"


# ------------------------------------------------------------------------------------------ classification
METRIC_ROWS = (("accuracy", "accuracy"), ("macro_precision", "macro precision"), ("macro_recall", "macro recall"),
               ("macro_f1", "macro F1"), ("kappa", "Cohen's kappa"), ("auc", "AUC (one-vs-rest)"),
               ("ap", "average precision"))


def fmt(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def row_normalised(matrix: list[list[int]]) -> list[list[float | None]]:
    """Each true class's row as fractions of its samples (None for a class with no samples in the split)."""
    return [[count / sum(row) if sum(row) else None for count in row] for row in matrix]


def confusion_table(matrix: list[list[Any]], classes: list[str], normalised: bool) -> str:
    """Rows true, columns predicted; cells shaded by the row's fraction, so both tables read the same way."""
    esc = html.escape
    fractions = row_normalised(matrix) if not normalised else matrix
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for name, values, shares in zip(classes, matrix, fractions, strict=True):
        cells = []
        for value, share in zip(values, shares, strict=True):
            shade = f' style="background:rgba(30,90,200,{0.7 * share:.2f})"' if share else ""
            text = fmt(value) if normalised else str(value)
            cells.append(f"<td{shade}>{text}</td>")
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    return (f'<table class="confusion"><tr><th>true \\ predicted</th>{head}</tr>{"".join(rows)}</table>')


def classification_metrics_html(metrics: dict[str, Any], classes: list[str], scope: str = "") -> str:
    """The split's metrics table, then its confusion matrix as counts and row-normalised (recall per class on
    the diagonal)."""
    esc = html.escape
    kappa = f" ({metrics['kappa_weights']} weights)" if metrics.get("kappa_weights", "none") != "none" else ""
    rows = "".join(f"<tr><td>{label}{kappa if key == 'kappa' else ''}</td><td>{fmt(metrics.get(key))}</td></tr>"
                   for key, label in METRIC_ROWS)
    per_class = "".join(f"<tr><td>F1 {esc(name)}</td><td>{fmt(value)}</td></tr>"
                        for name, value in metrics.get("per_class_f1", {}).items())
    title = f"<h3>{esc(scope)}</h3>\n" if scope else ""
    return (f"{title}<p>all {metrics['n']} samples of the split (not only those drawn below)</p>\n"
            f"<table>{rows}{per_class}</table>\n"
            f"<h3>Confusion matrix{f' ({esc(scope)})' if scope else ''}: counts</h3>\n"
            f"{confusion_table(metrics['confusion_matrix'], classes, normalised=False)}\n"
            f"<h3>Confusion matrix{f' ({esc(scope)})' if scope else ''}: row-normalised</h3>\n"
            f"{confusion_table(row_normalised(metrics['confusion_matrix']), classes, normalised=True)}\n")
