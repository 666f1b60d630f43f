"""Grad-CAM (models.explain) on models whose answer is known: the heat map must sit where the evidence is."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.architectures import build_model
from models.explain import grad_cam, last_feature_layer
from models.tasks import BRAIN_TUMOR


def brightness_model() -> keras.Model:
    """Class 1's logit grows with the mean brightness, class 0's shrinks; the feature map is the image itself."""
    inputs = keras.Input((32, 32, 1))
    features = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    outputs = dense(pooled)
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.array([[-0.05, 0.05]], dtype=np.float32), np.zeros(2, dtype=np.float32)])
    return model


def test_heat_map_sits_on_the_evidence() -> None:
    image = np.zeros((1, 32, 32, 1), dtype=np.float32)
    image[0, :16, :16, 0] = 200.0  # the only bright (class-1) evidence: the top-left quadrant
    heat = grad_cam(brightness_model(), image, class_index=1)
    assert heat.shape == (1, 32, 32) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0)
    inside, outside = heat[0, 2:14, 2:14], heat[0, 18:, 18:]
    assert inside.min() > 0.9 and outside.max() < 0.05


def test_class_without_support_gets_an_empty_map() -> None:
    image = np.zeros((1, 32, 32, 1), dtype=np.float32)
    image[0, :16, :16, 0] = 200.0
    heat = grad_cam(brightness_model(), image, class_index=0)  # brightness counts *against* class 0
    assert np.all(heat == 0.0)


def test_every_image_of_a_batch_is_explained_on_its_own() -> None:
    images = np.zeros((2, 32, 32, 1), dtype=np.float32)
    images[0, :16, :, 0] = 150.0  # top half
    images[1, 16:, :, 0] = 150.0  # bottom half
    heat = grad_cam(brightness_model(), images, class_index=1)
    assert heat[0, :14].mean() > 0.9 and heat[0, 18:].mean() < 0.05
    assert heat[1, 18:].mean() > 0.9 and heat[1, :14].mean() < 0.05


def test_shipped_architecture_and_bad_input() -> None:
    model = build_model("triage-cnn", BRAIN_TUMOR, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1))
    assert last_feature_layer(model).name == "stage4_block1_out"
    batch = np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:])).astype(np.float32)
    heat = grad_cam(model, batch, class_index=2)
    assert heat.shape == (1, *model.input_shape[1:3]) and 0.0 <= heat.min() <= heat.max() <= 1.0
    with pytest.raises(ValueError, match="outside"):
        grad_cam(model, batch, class_index=4)
    with pytest.raises(ValueError, match="must be"):
        grad_cam(model, batch[0], class_index=0)
    with pytest.raises(ValueError, match="no spatial feature map"):
        grad_cam(build_model("threshold", BRAIN_TUMOR), batch, class_index=0)
