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
