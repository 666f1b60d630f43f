"""Starting a model from another trained model's weights (fine-tuning, transfer between tasks).

Layers are matched by name, and a layer's weights are copied only when every array has the same shape. Our
architectures name their layers, so a ``triage-cnn`` of any task takes every layer of another ``triage-cnn`` but the
classifier (its class count differs between tasks), and a different input size or channel count only leaves the
layers whose shapes depend on it as initialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.inference import Classifier


@dataclass(frozen=True)
class WeightTransfer:
    """What :func:`copy_matching_weights` did; recorded in the new model's card."""

    source: str
    source_uid: str
    source_task: str
    source_architecture: str
    #: Layers whose weights came from the source, and those left as initialised (absent there, or shaped otherwise).
    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "source_uid": self.source_uid, "source_task": self.source_task,
            "source_architecture": self.source_architecture, "copied_layers": len(self.copied),
            "fresh_layers": self.fresh,
        }

    def describe(self) -> str:
        fresh = ", ".join(self.fresh) if self.fresh else "none"
        return (f"started from {self.source} ({self.source_task}, {self.source_architecture}, uid {self.source_uid}): "
                f"{len(self.copied)} layers copied; as initialised: {fresh}")


def copy_matching_weights(model: Any, source: Classifier) -> WeightTransfer:
    """Copy into ``model`` (a Keras model, in place) the weights of every same-named, same-shaped layer of
    ``source`` (:meth:`Classifier.load` of a model folder, which refuses a folder that holds no valid model).

    Raises ``ValueError`` when not one layer with weights matches: nothing would be transferred.
    """
    source_layers = {layer.name: layer for layer in source.model.layers}
    copied: list[str] = []
    fresh: list[str] = []
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        donor = source_layers.get(layer.name)
        donor_weights = donor.get_weights() if donor is not None else []
        if len(donor_weights) == len(weights) and all(a.shape == b.shape for a, b in zip(donor_weights, weights)):
            layer.set_weights(donor_weights)
            copied.append(layer.name)
        else:
            fresh.append(layer.name)
    if not copied:
        raise ValueError(f"{source.model_dir}: its {source.card.architecture} model shares no layer (same name and weight "
                         f"shapes) with {model.name}; nothing to start from")
    return WeightTransfer(
        source=str(source.model_dir), source_uid=source.card.uid, source_task=source.card.task,
        source_architecture=source.card.architecture, copied=copied, fresh=fresh,
    )


def interpolate_weights(model: Any, source: Classifier, weight: float) -> None:
    """Set ``model``'s weights (in place) to ``weight * model + (1 - weight) * source``, variable by variable,
    batch-normalisation statistics included.

    For a model fine-tuned from ``source`` (every layer copied, nothing fresh): weights between a model and its own
    fine-tune keep most of what the fine-tune learned on new data while losing less of what the source knew
    (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022). Raises ``ValueError`` when the two do
    not have the same variables.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight {weight} is not between 0 and 1")
    ours, theirs = model.weights, source.model.weights
    if [(v.path, tuple(v.shape)) for v in ours] != [(v.path, tuple(v.shape)) for v in theirs]:
        raise ValueError(f"{source.model_dir}: its variables are not this model's; only a fine-tune of it can be "
                         "interpolated with it")
    for mine, base in zip(ours, theirs):
        mine.assign(weight * np.asarray(mine) + (1.0 - weight) * np.asarray(base))
