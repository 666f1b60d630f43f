"""Classification metrics from labels and probabilities (numpy only): accuracy, per-class P/R/F1, confusion, AUC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); ``None`` if one side is empty."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    # Average ranks over ties.
    unique, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything the evaluate command reports for one split, JSON-ready."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    aucs = []
    for c, name in enumerate(class_names):
        tp = confusion[c, c]
        precision = tp / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
        recall = tp / confusion[c, :].sum() if confusion[c, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        auc = roc_auc(labels == c, probabilities[:, c])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[c, :].sum()), "roc_auc": auc}
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "per_class": per_class,
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
        "roc_auc": float(np.mean(aucs)) if aucs else None,  # one-vs-rest, macro average
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def misclassified(labels: np.ndarray, probabilities: np.ndarray, files: Sequence[str],
                  class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The wrongly classified images of a split, the most confidently wrong first: each one's file, true class,
    predicted class and the probability the model gave its prediction. JSON-ready."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    return [{"file": files[i], "true": class_names[int(labels[i])], "predicted": class_names[int(predicted[i])],
             "probability": round(float(probabilities[i, predicted[i]]), 4)} for i in wrong]


def format_misclassified(errors: Sequence[dict[str, Any]]) -> str:
    """Text lines of :func:`misclassified`."""
    lines = [f"  misclassified ({len(errors)}, the most confident first):"]
    width = max((len(e["file"]) for e in errors), default=0)
    lines += [f"    {e['file']:<{width}}  {e['true']} -> {e['predicted']} ({e['probability']:.3f})" for e in errors]
    return "\n".join(lines)


def format_metrics(split: str, metrics: dict[str, Any]) -> str:
    """Human-readable text of :func:`classification_metrics` for one split."""
    names = metrics["class_names"]
    auc = metrics["roc_auc"]
    lines = [f"== {split}: n={metrics['n']} accuracy={metrics['accuracy']:.2%} macro-F1={metrics['macro_f1']:.4f} "
             f"ROC AUC={'n/a' if auc is None else f'{auc:.4f}'}"]
    lines.append(f"  {'class':<12} {'precision':>9} {'recall':>7} {'F1':>7} {'AUC':>7} {'support':>7}")
    for name in names:
        m = metrics["per_class"][name]
        class_auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        lines.append(f"  {name:<12} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {class_auc:>7} "
                     f"{m['support']:>7}")
    width = max(len(n) for n in names)
    lines.append("  confusion (rows true, columns predicted): " + " ".join(names))
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"    {name:<{width}} " + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
