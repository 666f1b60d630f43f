"""Display images -> model input tensors: the one definition shared by training and inference.

A display image is a 2-D array of grey values 0..255 (uint8 or float), any size. The model input is
``(N, height, width, channels)`` float32 in 0..255; scaling to 0..1 lives inside each saved model (a ``Rescaling``
layer), so nothing outside the model needs to know it. :func:`prepare_image` is a TensorFlow tensor function, so
the training ``tf.data`` pipeline maps the very same code that :func:`prepare_batch` runs at inference time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf


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


def prepare_image(image: "tf.Tensor", spec: InputSpec) -> "tf.Tensor":
    """Grey image(s) 0..255 -> float32 0..255 at the spec's size and channels.

    Takes one image (H, W) or (H, W, 1) -> (height, width, channels), or a stack of equal-sized images
    (N, H, W, 1) -> (N, height, width, channels). Antialiased bilinear resizing, so downscaling does not alias.
    """
    import tensorflow as tf  # imported here so InputSpec works on a Keras-JAX host without TensorFlow

    image = tf.convert_to_tensor(image)
    image = tf.cast(image, tf.float32)
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    if image.shape[-1] != 1:
        raise ValueError(f"expected grey images with one channel, got shape {image.shape}")
    image = tf.image.resize(image, (spec.height, spec.width), method="bilinear", antialias=True)
    image = tf.clip_by_value(image, 0.0, 255.0)
    if spec.channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    return image


def prepare_batch(images: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Display images (2-D grey arrays 0..255, any sizes) -> ``(N, height, width, channels)`` float32 0..255."""
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
    # Equal-sized images (a series' slices) are resized as one stack: one TF call instead of one per image.
    for indices in by_shape.values():
        stack = np.stack([arrays[i] for i in indices])[..., np.newaxis]
        out[indices] = prepare_image(stack, spec).numpy()
    return out
