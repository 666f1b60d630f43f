"""tf.data input pipelines: decoded images -> :func:`models.preprocessing.prepare_batch` -> cache -> batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from models.preprocessing import InputSpec, prepare_batch

#: Images prepared per call of :func:`prepare_batch` while the dataset is first read (before the cache): bounds the
#: memory the preparation itself holds.
_PREPARE_CHUNK = 256


def image_dataset(
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    spec: InputSpec,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of (model input, one-hot label). Images are prepared once and cached; shuffled when a seed is given.

    The images are decoded already (see :mod:`training.data`); :func:`prepare_batch`, the function inference runs,
    prepares them here too, so training and inference see the same tensor bit for bit.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")

    def generate():
        for start in range(0, len(images), _PREPARE_CHUNK):
            prepared = prepare_batch(images[start:start + _PREPARE_CHUNK], spec)
            yield from zip(prepared, labels[start:start + _PREPARE_CHUNK].tolist())

    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(tf.TensorSpec(shape=spec.shape, dtype=tf.float32), tf.TensorSpec(shape=(), dtype=tf.int64)),
    )
    # A generator's length is unknown to tf.data; stating it lets Keras know the steps per epoch (cosine schedule).
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(images)))
    dataset = dataset.map(
        lambda image, label: (image, tf.one_hot(label, num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def prepared_array(images: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """All ``images`` through the pipeline's preparation, as one ``(N, H, W, C)`` float32 array."""
    dummy = np.zeros(len(images), dtype=np.int64)
    batches = [x.numpy() for x, _ in image_dataset(images, dummy, 1, spec, batch_size=256)]
    return np.concatenate(batches) if batches else np.zeros((0, *spec.shape), np.float32)
