"""Grad-CAM (Selvaraju et al. 2017): where in the image a classifier looked for a class.

The class score's gradient with respect to the last convolutional feature map, averaged over space, weights that
map's channels; their ReLU'd sum, scaled to 0..1 and resized to the input, is the heat map. The feature map is the
last layer of the (functional) model with a spatial output, so it works for every architecture in
:mod:`models.architectures` with convolutions; a nested backbone (``resnet50``) counts as one layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def last_feature_layer(model: Any) -> Any:
    """The last top-level layer of ``model`` whose output is a spatial map ``(N, h, w, c)``."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = getattr(layer, "output", None)
        if shape is not None and len(shape.shape) == 4:
            return layer
    raise ValueError(f"model {model.name!r} has no spatial feature map, so Grad-CAM cannot explain it")


def grad_cam(model: Any, image_batch: np.ndarray, class_index: int, layer_name: str | None = None) -> np.ndarray:
    """Heat maps ``(N, H, W)`` float32 in 0..1 for ``class_index``, at the model's input size.

    ``image_batch`` is the model input ``(N, H, W, C)`` (from :func:`models.preprocessing.prepare_batch`).
    ``layer_name`` picks the feature layer; by default the last spatial one. An image whose gradients are all
    zero (the class has no support anywhere) gets an all-zero map.
    """
    import keras
    import tensorflow as tf

    batch = np.asarray(image_batch, dtype=np.float32)
    if batch.ndim != 4:
        raise ValueError(f"image_batch must be (N, H, W, C); got shape {batch.shape}")
    num_classes = int(model.output_shape[-1])
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} is outside 0..{num_classes - 1}")
    layer = model.get_layer(layer_name) if layer_name else last_feature_layer(model)
    # Two models split at the feature map, so the backward pass covers only the head. Through the whole model,
    # TensorFlow also ran the earlier convolutions' filter gradients, which oneDNN's CPU kernel crashed on (a
    # segfault on AVX-512/AMX machines) and which Grad-CAM never uses.
    feature_model = keras.Model(model.input, layer.output)
    head = keras.Model(layer.output, model.output)
    features = tf.convert_to_tensor(feature_model(tf.convert_to_tensor(batch), training=False))
    with tf.GradientTape() as tape:
        tape.watch(features)
        score = head(features, training=False)[:, class_index]
    grads = tape.gradient(score, features)
    channel_weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    cam = tf.image.resize(cam[..., tf.newaxis], batch.shape[1:3], method="bilinear")[..., 0]
    return np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32)
