"""Classifier architectures by name: the study's models (for reproduction) and our own, ``triage-cnn``.

Every model takes ``(N, H, W, C)`` float32 grey values 0..255 (see :mod:`models.preprocessing`) and returns
softmax probabilities in the task's class order. Scaling is a layer inside the model, so a saved model carries its
own preprocessing and runs unchanged on any Keras backend (TensorFlow here, JAX on a
GPU training host). Only Keras is imported here, never TensorFlow.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from models.preprocessing import InputSpec
from models.tasks import Task

#: BatchNormalization momentum of triage-cnn. Keras' default 0.99 lets the moving statistics trail the fast-changing
#: activations of a from-scratch net (starting from variance 1 against ~0.005 measured): inference-mode validation
#: then collapsed to one class for whole epochs. 0.9 tracks within ~50 steps.
BN_MOMENTUM = 0.9

#: The study's black-pixel threshold (grey value) for the ``threshold`` baseline.
BLACK_THRESHOLD = 120.0

# ResNet50's ImageNet weights without the top, as Keras names them in its cache (~/.keras/models/).
_RESNET50_NOTOP = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# The 'caffe' preprocessing ResNet50's ImageNet weights expect (BGR means; grey inputs make the order moot).
_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every layer is the identity at inference."""

    flip: bool = True
    rotation: float = 0.03  # fraction of a full turn (0.03 = about 11 degrees)
    zoom: float = 0.1
    shear: float = 0.05
    translation: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(flip=False, rotation=0.0, zoom=0.0, shear=0.0, translation=0.0, brightness=0.0, contrast=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def augmentation_block(aug: Augmentation, seed: int | None = None) -> list[layers.Layer]:
    """Keras preprocessing layers for ``aug``, working on 0..255 values (before rescaling)."""
    out: list[layers.Layer] = []
    if aug.flip:
        out.append(layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        out.append(layers.RandomRotation(aug.rotation, fill_mode="constant", seed=seed))
    if aug.zoom:
        out.append(layers.RandomZoom(aug.zoom, fill_mode="constant", seed=seed))
    if aug.shear:
        out.append(layers.RandomShear(aug.shear, aug.shear, fill_mode="constant", seed=seed))
    if aug.translation:
        out.append(layers.RandomTranslation(aug.translation, aug.translation, fill_mode="constant", seed=seed))
    if aug.brightness:
        out.append(layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    if aug.contrast:
        out.append(layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    return out


@keras.saving.register_keras_serializable(package="dicom_triage")
class BlackPixelNearestMean(layers.Layer):
    """The study's baseline: the fraction of pixels darker than ``threshold``, classified by the nearest class mean.

    Not trained by gradient: :func:`fit_threshold_model` sets the class means. Outputs a softmax over the negative
    distances (sharpness ``temperature``) so that ROC AUC has a score to rank.
    """

    def __init__(self, num_classes: int, threshold: float = BLACK_THRESHOLD, temperature: float = 50.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.threshold = threshold
        self.temperature = temperature

    def build(self, input_shape: Any) -> None:
        self.class_means = self.add_weight(
            name="class_means", shape=(self.num_classes,), initializer="zeros", trainable=False
        )

    def black_fraction(self, inputs: Any) -> Any:
        black = keras.ops.cast(keras.ops.less(inputs[..., 0], self.threshold), "float32")
        return keras.ops.mean(black, axis=(1, 2))

    def call(self, inputs: Any) -> Any:
        fraction = self.black_fraction(inputs)
        distance = keras.ops.abs(fraction[:, None] - self.class_means[None, :])
        return keras.ops.softmax(-self.temperature * distance, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "threshold": self.threshold,
                "temperature": self.temperature}


def fit_threshold_model(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Set a ``threshold`` model's class means from training images ``(N,H,W,C)`` and integer labels; return them."""
    layer = model.get_layer("black_pixel_nearest_mean")
    fractions = keras.ops.convert_to_numpy(layer.black_fraction(keras.ops.convert_to_tensor(images)))
    means = np.array(
        [fractions[labels == c].mean() if np.any(labels == c) else 0.0 for c in range(layer.num_classes)],
        dtype=np.float32,
    )
    layer.class_means.assign(means)
    return means


def _study_brain_cnn(x: Any, task: Task, dropout: float, batch_norm: bool) -> Any:
    # As the study: three 7x7 conv blocks, then a deep dense head (Keras' default 'valid' padding).
    for filters in (64, 128, 256):
        x = layers.Conv2D(filters, 7, activation="relu")(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    for units, rate in ((256, 0.2), (128, 0.2)):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(rate)(x)
    x = layers.Dense(64, activation="relu")(x)
    return x


def _study_covid_cnn(x: Any, task: Task, dropout: float, batch_norm: bool) -> Any:
    # 'same' padding: with 'valid' the seven poolings of a 256x256 input would run out of pixels.
    for filters in (16, 32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    for _ in range(3):
        x = layers.Conv2D(256, 3, padding="same", activation="relu")(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(500, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return x


def _residual_block(x: Any, filters: int, stride: int, name: str) -> Any:
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    # Zero-initialised last BN: each block starts as the identity, which trains deep nets from scratch faster.
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, gamma_initializer="zeros", name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def _triage_cnn(x: Any, task: Task, dropout: float, batch_norm: bool, widths: tuple[int, ...] = (32, 64, 128, 256),
                blocks: tuple[int, ...] = (1, 2, 2, 1)) -> Any:
    # A small ResNet for grey slices: a strided stem, four residual stages that halve the size, global pooling.
    # Sized for >= 200 images/s on two CPU cores (about 0.1 GMAC per 128x128 image; 192x192, the COVID model's
    # input, measured 740 images/s at batch 32 on a quiet host, 472 end to end from display images).
    x = layers.Conv2D(24, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, (filters, count) in enumerate(zip(widths, blocks)):
        for index in range(count):
            x = _residual_block(x, filters, 2 if index == 0 else 1, name=f"stage{stage + 1}_block{index + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return x


def _resnet50_base(x: Any, spec: InputSpec, weights: str | None) -> Any:
    weights_file = resolve_resnet50_weights(weights)
    x = layers.Normalization(mean=list(_IMAGENET_BGR_MEAN), variance=[1.0, 1.0, 1.0], name="imagenet_caffe")(x)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=spec.shape)
    if weights_file is not None:
        base.load_weights(str(weights_file))
    x = base(x)
    x = layers.MaxPooling2D(padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(150, activation="relu")(x)
    return x


def resolve_resnet50_weights(weights: str | None) -> Path | None:
    """``None`` -> from scratch; ``imagenet`` -> Keras' cached no-top file if present; else a local ``.h5`` path.

    Never downloads: without the file it says so on stderr and returns ``None`` (train from scratch).
    """
    if weights is None:
        return None
    if weights == "imagenet":
        # Where keras.utils.get_file would have cached it: $KERAS_HOME, else ~/.keras.
        cached = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
        candidate = cached / "models" / _RESNET50_NOTOP
        if candidate.is_file():
            return candidate
        print(f"resnet50: ImageNet weights not found at {candidate}; training from scratch", file=sys.stderr)
        return None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"resnet50 weights file {path} does not exist")
    return path


#: Default input per architecture (the study's sizes; ours per task, chosen for CPU speed).
_DEFAULT_INPUTS: dict[str, InputSpec] = {
    "study-brain-cnn": InputSpec(64, 64, 3),
    "study-covid-cnn": InputSpec(256, 256, 1),
    "resnet50": InputSpec(224, 224, 3),
    "threshold": InputSpec(256, 256, 1),
    "triage-cnn": InputSpec(128, 128, 1),
}
#: The shipped models' inputs. Brain-tumor is 128: in a 55-minute CPU budget it fits 174 epochs against 160's 96,
#: and scored 98.78%/98.55% against 97.56%/97.22% (given 200 GPU epochs, 160 was 0.3-0.6 points ahead).
#: COVID CT is 192: under the same budget it fits ~180 epochs, and its two seeds reached validation losses of 0.26
#: and 0.29 against 0.28 for 160 (140 epochs) and 0.42 for 224 (86 epochs); see docs/results.md.
_TRIAGE_INPUTS: dict[str, InputSpec] = {"brain-tumor": InputSpec(128, 128, 1), "covid-ct": InputSpec(192, 192, 1)}

ARCHITECTURES: tuple[str, ...] = tuple(_DEFAULT_INPUTS)


def default_input_spec(arch: str, task: Task) -> InputSpec:
    """The input an architecture uses unless told otherwise."""
    check_architecture(arch)
    if arch == "triage-cnn":
        return _TRIAGE_INPUTS.get(task.name, _DEFAULT_INPUTS[arch])
    return _DEFAULT_INPUTS[arch]


def check_architecture(arch: str) -> None:
    if arch not in _DEFAULT_INPUTS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_model(
    arch: str,
    task: Task,
    input_spec: InputSpec | None = None,
    *,
    dropout: float | None = None,
    batch_norm: bool = True,
    weights: str | None = None,
    **options: Any,
) -> keras.Model:
    """Build (uncompiled) ``arch`` for ``task``; ``weights`` is for resnet50 only.

    ``options`` go to the architecture (``triage-cnn``: ``widths``, ``blocks``).
    """
    check_architecture(arch)
    spec = input_spec or default_input_spec(arch, task)
    if arch == "resnet50" and spec.channels != 3:
        raise ValueError("resnet50 needs 3 input channels")
    if weights is not None and arch != "resnet50":
        raise ValueError(f"--weights applies to resnet50 only, not {arch}")
    inputs = keras.Input(shape=spec.shape, name="image")
    if arch == "threshold":
        outputs = BlackPixelNearestMean(task.num_classes, name="black_pixel_nearest_mean")(inputs)
        return keras.Model(inputs, outputs, name=arch)
    x = inputs
    if arch == "resnet50":
        x = _resnet50_base(x, spec, weights)
    else:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        if arch == "study-brain-cnn":
            x = _study_brain_cnn(x, task, 0.5 if dropout is None else dropout, batch_norm)
        elif arch == "study-covid-cnn":
            x = _study_covid_cnn(x, task, 0.3 if dropout is None else dropout, batch_norm)
        else:
            triage_options = {k: tuple(v) for k, v in options.items() if k in ("widths", "blocks")}
            x = _triage_cnn(x, task, 0.3 if dropout is None else dropout, batch_norm, **triage_options)
    # float32 whatever the global policy: a softmax in bfloat16 rounds probabilities to 3 digits (mixed-precision
    # training builds the model under a mixed policy; see training.fit.dtype_policy).
    outputs = layers.Dense(task.num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=arch)


def with_augmentation(model: keras.Model, augmentation: Augmentation, seed: int | None = None) -> keras.Model:
    """A training wrapper: ``augmentation`` layers, then ``model`` (sharing its weights). Save ``model``, not this."""
    aug_layers = augmentation_block(augmentation, seed=seed)
    if not aug_layers:
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    x = inputs
    for layer in aug_layers:
        x = layer(x)
    return keras.Model(inputs, model(x), name=f"{model.name}_augmented")


def is_gradient_trained(arch: str) -> bool:
    """Whether ``arch`` is trained by ``model.fit`` (all but the threshold baseline)."""
    return arch != "threshold"
