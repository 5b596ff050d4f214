"""Classification metrics, all from scikit-learn (no hand-written metric code)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], ordinal: bool = False) -> dict:
    """Accuracy, macro P/R/F1, Cohen's kappa (quadratic-weighted for ordinal grades), one-vs-rest AUC and AP
    (over classes present), per-class F1, confusion matrix. Undefined values (e.g. AUC with one class present)
    are None, not 0."""
    predictions = probs.argmax(1)
    indices = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            labels, predictions, labels=indices, average="macro", zero_division=0)
        per_class_f1 = skm.f1_score(labels, predictions, labels=indices, average=None, zero_division=0)
        kappa = skm.cohen_kappa_score(labels, predictions, labels=indices, weights="quadratic" if ordinal else None)
        present = [c for c in indices if (labels == c).any()]
        auc = ap = None
        if len(present) >= 2:
            onehot = np.eye(len(classes))[labels][:, present]
            auc = float(skm.roc_auc_score(onehot, probs[:, present], average="macro"))
            ap = float(skm.average_precision_score(onehot, probs[:, present], average="macro"))
    return {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "kappa": None if np.isnan(kappa) else float(kappa),
        "kappa_weights": "quadratic" if ordinal else "none",
        "auc": auc,
        "ap": ap,
        "per_class_f1": {name: float(value) for name, value in zip(classes, per_class_f1, strict=True)},
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=indices).tolist(),
        "n": int(len(labels)),
    }


IGNORE = 255  # a multi-label target that is unknown (e.g. CheXpert's uncertain label under the `ignore` policy)


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Per-label AUROC and AP over the samples whose label is known (scikit-learn), their means over the labels
    where both outcomes occur (`mean_auroc`, what ChestX-ray14 papers report), and F1 at 0.5. Labels with a
    single outcome in the split get None and stay out of the means."""
    per_auroc, per_ap, per_f1 = {}, {}, {}
    for index, name in enumerate(classes):
        known = targets[:, index] != IGNORE
        truth, scores = targets[known, index].astype(int), probs[known, index]
        if truth.size and 0 < truth.sum() < truth.size:
            per_auroc[name] = float(skm.roc_auc_score(truth, scores))
            per_ap[name] = float(skm.average_precision_score(truth, scores))
            per_f1[name] = float(skm.f1_score(truth, scores >= 0.5, zero_division=0))
        else:
            per_auroc[name] = per_ap[name] = per_f1[name] = None
    defined = [v for v in per_auroc.values() if v is not None]
    return {
        "mean_auroc": float(np.mean(defined)) if defined else None,
        "mean_ap": float(np.mean([v for v in per_ap.values() if v is not None])) if defined else None,
        "macro_f1": float(np.mean([v for v in per_f1.values() if v is not None])) if defined else None,
        "labels_scored": len(defined),
        "per_label_auroc": per_auroc,
        "per_label_ap": per_ap,
        "n": int(len(targets)),
    }
