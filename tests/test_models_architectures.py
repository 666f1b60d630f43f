"""models.architectures: every architecture builds for every task; the study's layouts; the baselines."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.architectures import (
    ARCHITECTURES,
    Augmentation,
    build_model,
    default_input_spec,
    fit_threshold_model,
    resolve_resnet50_weights,
    with_augmentation,
)
from models.preprocessing import InputSpec
from models.tasks import BRAIN_TUMOR, COVID_CT


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "resnet50"])
@pytest.mark.parametrize("task", [BRAIN_TUMOR, COVID_CT])
def test_every_architecture_builds_for_every_task(arch, task):
    model = build_model(arch, task)
    spec = default_input_spec(arch, task)
    assert model.input_shape == (None, *spec.shape) and model.output_shape == (None, task.num_classes)
    out = np.asarray(model(np.random.default_rng(0).uniform(0, 255, (2, *spec.shape)).astype(np.float32)))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_study_layouts():
    brain = build_model("study-brain-cnn", BRAIN_TUMOR)
    convs = [l for l in brain.layers if isinstance(l, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size) for c in convs] == [(64, (7, 7)), (128, (7, 7)), (256, (7, 7))]
    assert [l.units for l in brain.layers if isinstance(l, keras.layers.Dense)] == [256, 128, 64, 4]
    covid = build_model("study-covid-cnn", COVID_CT)
    assert [c.filters for c in covid.layers if isinstance(c, keras.layers.Conv2D)] == [16, 32, 64, 128, 256, 256, 256]
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in covid.layers) == 3
    assert [l.units for l in covid.layers if isinstance(l, keras.layers.Dense)] == [500, 2]
    assert default_input_spec("study-covid-cnn", COVID_CT) == InputSpec(256, 256, 1)


def test_augmentation_wraps_without_changing_the_saved_model():
    model = build_model("triage-cnn", COVID_CT, InputSpec(64, 64, 1))
    wrapped = with_augmentation(model, Augmentation(), seed=1)
    assert wrapped is not model and with_augmentation(model, Augmentation.none()) is model
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(wrapped(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6)
    assert not np.allclose(np.asarray(wrapped(x, training=True)), np.asarray(model(x, training=True)))


def test_threshold_baseline_learns_class_means_of_black_fraction():
    model = build_model("threshold", COVID_CT, InputSpec(16, 16, 1))
    dark = np.zeros((3, 16, 16, 1), np.float32)
    light = np.full((3, 16, 16, 1), 200.0, np.float32)
    means = fit_threshold_model(model, np.concatenate([dark, light]), np.array([0, 0, 0, 1, 1, 1]))
    np.testing.assert_allclose(means, [1.0, 0.0])
    assert np.asarray(model(np.concatenate([dark[:1], light[:1]]))).argmax(1).tolist() == [0, 1]


def test_resnet50_weights_are_never_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert resolve_resnet50_weights("imagenet") is None
    assert "training from scratch" in capsys.readouterr().err
    cached = tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert resolve_resnet50_weights("imagenet") == cached
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resnet50_weights(str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("resnet50", BRAIN_TUMOR, InputSpec(64, 64, 1))


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'vit'; known: triage-cnn|study"):
        build_model("vit", COVID_CT)
