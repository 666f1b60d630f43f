"""Calibrated probabilities: temperature scaling of a classifier's softmax (Guo et al., ICML 2017).

A network trained with cross-entropy is often over-confident: of the images it calls 0.95, fewer than 95% are
right. Dividing its logits by one temperature ``T`` fitted on held-out images (minimum negative log-likelihood)
fixes most of that and keeps the order of the probabilities, so accuracy, ROC AUC and the argmax are unchanged. The
saved models end in a softmax, so the logits are taken as the log of its probabilities (equal up to a constant
per image, which the softmax ignores).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_temperature", "fit_temperature"]

_EPSILON = 1e-7


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row; ``T == 1`` returns ``probabilities`` unchanged."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0 or probabilities.size == 0:
        return probabilities.astype(np.float32)
    logits = np.log(np.clip(probabilities, _EPSILON, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def _nll(probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = apply_temperature(probabilities, temperature).astype(np.float64)
    return float(-np.mean(np.log(np.clip(scaled[np.arange(len(labels)), labels], _EPSILON, 1.0))))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the negative log-likelihood of ``labels`` (class indices)
    under ``probabilities`` ``(N, C)``: a golden-section search on log T (the NLL is unimodal in T)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("calibration needs at least one labelled image")
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = _nll(probabilities, labels, float(np.exp(a))), _nll(probabilities, labels, float(np.exp(b)))
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _nll(probabilities, labels, float(np.exp(a)))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _nll(probabilities, labels, float(np.exp(b)))
    return round(float(np.exp((low + high) / 2.0)), 4)
