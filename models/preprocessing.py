"""Display images -> model input tensors: the one definition shared by training and inference.

A display image is a 2-D array of grey values 0..255 (uint8 or float), any size. The model input is
``(N, height, width, channels)`` float32 in 0..255; scaling to 0..1 lives inside each saved model (a ``Rescaling``
layer), so nothing outside the model needs to know it.

The resize is TensorFlow's antialiased bilinear (``tf.image.resize(..., antialias=True)``: a triangle kernel
widened by the downscaling factor, weights renormalised at the edges), which the models were first trained with,
computed in NumPy (:func:`resize_weights`): :func:`prepare_batch` is the one preparation that the training
``tf.data`` pipeline, calibration and the worker all run, and the worker needs no TensorFlow (a Keras-JAX or
Keras-PyTorch GPU host) and its decoding processes stay light. ``tests/test_models_preprocessing.py`` checks it
against TensorFlow's own resize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """The size and channel count of a model's input; grey images are repeated over ``channels``."""

    height: int
    width: int
    channels: int = 1

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size {self.height}x{self.width} is too small (at least 8x8)")
        if self.channels not in (1, 3):
            raise ValueError(f"input channels must be 1 or 3, not {self.channels}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputSpec":
        return cls(height=int(data["height"]), width=int(data["width"]), channels=int(data.get("channels", 1)))


@lru_cache(maxsize=64)
def resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float32 weights of TensorFlow's antialiased bilinear resize along one axis.

    As TensorFlow's ``ScaleAndTranslate`` computes them: output pixel ``i`` samples the input at
    ``(i + 0.5) / scale`` (pixel centres, ``scale = size_out / size_in``) with a triangle kernel of radius 1,
    stretched by ``1 / scale`` when shrinking so that every input pixel counts; each row is normalised to sum 1.
    """
    scale = size_out / size_in
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(size_out, dtype=np.float64) + 0.5) / scale
    inputs = np.arange(size_in, dtype=np.float64) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(inputs[np.newaxis, :] - centres[:, np.newaxis]) / kernel_scale)
    totals = weights.sum(axis=1, keepdims=True)
    return (weights / np.where(totals > 0, totals, 1.0)).astype(np.float32)


def prepare_batch(images: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Display images (2-D grey arrays 0..255, any sizes) -> ``(N, height, width, channels)`` float32 0..255.

    NumPy only (see the module docstring): an antialiased bilinear resize as ``rows @ image @ columns.T``, clipped
    to 0..255."""
    out = np.empty((len(images), *spec.shape), dtype=np.float32)
    by_shape: dict[tuple[int, int], list[int]] = {}
    arrays = []
    for index, image in enumerate(images):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or array.size == 0:
            raise ValueError(f"image {index} has shape {array.shape}; expected a non-empty 2-D grey image")
        arrays.append(array)
        by_shape.setdefault(array.shape, []).append(index)
    # Equal-sized images (a series' slices) are resized as one stack: two matrix products for all of them.
    for (height, width), indices in by_shape.items():
        stack = np.stack([arrays[i] for i in indices]).astype(np.float32, copy=False)
        out[indices] = np.clip(_resize_stack(stack, spec.height, spec.width), 0.0, 255.0)[..., np.newaxis]
    return out  # the grey value broadcasts over 1 or 3 channels (grey repeated as RGB)


def _resize_stack(stack: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, height, width)``: ``rows @ image @ columns.T`` for every image, each product summed
    over its few non-zero weights (:func:`_taps`) rather than by BLAS: a dense product wastes most of its work on
    zeros, and OpenBLAS's threads on a loaded machine made it ten times slower (40 ms a frame, 4 ms here)."""
    _, rows_in, columns_in = stack.shape
    index, weight = _taps(columns_in, width)
    narrowed = sum(stack[:, :, index[:, tap]] * weight[:, tap] for tap in range(index.shape[1]))
    index, weight = _taps(rows_in, height)
    return sum(narrowed[:, index[:, tap], :] * weight[:, tap, np.newaxis] for tap in range(index.shape[1]))


@lru_cache(maxsize=64)
def _taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resize_weights` as ``(size_out, taps)`` input indices and weights: each output pixel's non-zero
    weights (the triangle kernel's span), padded with zero weights on pixel 0."""
    dense = resize_weights(size_in, size_out)
    nonzero = dense > 0
    taps = max(1, int(nonzero.sum(axis=1).max()))
    first = np.argmax(nonzero, axis=1)
    index = np.minimum(first[:, np.newaxis] + np.arange(taps), size_in - 1)
    weight = np.take_along_axis(dense, index, axis=1)
    # A span shorter than ``taps`` near the edge would repeat the last pixel: its repeats weigh nothing.
    weight[first[:, np.newaxis] + np.arange(taps) >= size_in] = 0.0
    return index, weight.astype(np.float32)
