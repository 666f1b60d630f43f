"""How far an image lies from a model's training images, in the model's own feature space.

A classifier answers every input with a class, also one it never saw the like of (an ear, a phantom, an abdomen,
a diffusion map). :class:`DomainModel` measures how typical an image is of the training images: the Mahalanobis
distance of its penultimate-layer features (the input of the softmax layer) to the nearest class mean, under one
covariance shared by the classes (Lee et al., NeurIPS 2018, "A simple unified framework for detecting
out-of-distribution samples"). The threshold is a high percentile of the distances of held-out images of the
curated set, so nearly every image like the training images passes, and a slice above it is out of the domain.

Stored beside the model as ``domain.npz`` (class means, precision matrix, threshold); the card's ``calibration``
records how it was fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DOMAIN_FILE", "DomainModel"]

DOMAIN_FILE = "domain.npz"

#: Shrinkage of the covariance towards its diagonal: a few thousand images in a 256-dimensional feature space give
#: a noisy estimate, and its small eigenvalues would make the distance unstable.
SHRINKAGE = 0.1


@dataclass(frozen=True)
class DomainModel:
    """Class means ``(C, D)``, the shared precision matrix ``(D, D)`` and the distance threshold."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, held_out: np.ndarray, percentile: float) -> "DomainModel":
        """Fit means and covariance on training ``features`` ``(N, D)`` with class ``labels``; the threshold is the
        ``percentile`` of the distances of the ``held_out`` features (images not fitted on)."""
        features = np.asarray(features, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        covariance = centred.T @ centred / max(1, len(features) - len(classes))
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.diag(np.diag(covariance))
        covariance += 1e-6 * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        unfitted = cls(means, np.linalg.inv(covariance), float("inf"))
        threshold = float(np.percentile(unfitted.distance(held_out), percentile))
        return cls(means, unfitted.precision, threshold)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` Mahalanobis distance of each feature row to its nearest class mean."""
        features = np.asarray(features, dtype=np.float64)
        if features.shape[0] == 0:
            return np.zeros(0)
        differences = features[:, None, :] - self.means[None, :, :]
        # The product with the precision matrix as one matrix multiplication (BLAS): a three-operand einsum took a
        # fifth of the brain model's inference time.
        squared = np.einsum("ncd,ncd->nc", differences @ self.precision, differences)
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def save(self, folder: Path | str) -> Path:
        path = Path(folder) / DOMAIN_FILE
        np.savez_compressed(path, means=self.means.astype(np.float32), precision=self.precision.astype(np.float32),
                            threshold=np.float64(self.threshold))
        return path

    @classmethod
    def load(cls, folder: Path | str) -> "DomainModel | None":
        """The model's domain file, or ``None`` when it has none (a model never calibrated)."""
        path = Path(folder) / DOMAIN_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return cls(data["means"].astype(np.float64), data["precision"].astype(np.float64),
                           float(data["threshold"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a domain file: {exc}") from None
