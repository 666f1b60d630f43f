"""models.preprocessing and models.imagefiles: the input tensor is one definition for training and inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.imagefiles import ImageFileError, read_grey_image
from models.preprocessing import InputSpec, prepare_batch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRAIN_IMAGE = DATA / "brain-tumor-mri" / "Testing" / "glioma" / "Te-gl_0010.jpg"
COVID_RGBA = DATA / "covid-ct" / "COVID" / "Covid (1069).png"

needs_data = pytest.mark.skipif(not BRAIN_IMAGE.is_file(), reason="../shared/data is not present")


def test_input_spec_json_round_trip_and_validation():
    spec = InputSpec(128, 96, 3)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert spec.shape == (128, 96, 3)
    with pytest.raises(ValueError, match="channels"):
        InputSpec(64, 64, 2)
    with pytest.raises(ValueError, match="too small"):
        InputSpec(4, 64, 1)


def test_prepare_batch_shapes_range_and_channel_repeat():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 200), dtype=np.uint8), rng.uniform(0, 255, (50, 70)).astype(np.float32)]
    grey = prepare_batch(images, InputSpec(64, 64, 1))
    assert grey.shape == (2, 64, 64, 1) and grey.dtype == np.float32
    assert grey.min() >= 0.0 and grey.max() <= 255.0
    rgb = prepare_batch(images, InputSpec(64, 64, 3))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(rgb[..., :1], grey)


def test_prepare_batch_uint8_and_float_inputs_agree_and_constant_stays_constant():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (100, 120), dtype=np.uint8)
    a = prepare_batch([image], InputSpec(32, 32, 1))
    b = prepare_batch([image.astype(np.float64)], InputSpec(32, 32, 1))
    np.testing.assert_allclose(a, b, atol=1e-4)
    flat = prepare_batch([np.full((500, 400), 77, np.uint8)], InputSpec(64, 64, 1))
    np.testing.assert_allclose(flat, 77.0, atol=1e-3)


#: prepare_batch computes TensorFlow's antialiased bilinear resize (the shipped models were first trained on it) in
#: NumPy; the two differ by float32 rounding only.
SAME_RESIZE_GREY = 5e-3


@pytest.mark.parametrize("shape, size", [((80, 80), 48), ((40, 90), 48), ((512, 512), 192), ((191, 250), 192),
                                         ((100, 60), 224), ((48, 48), 48)])
def test_prepare_batch_is_tensorflows_antialiased_bilinear_resize(shape, size):
    import tensorflow as tf

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3)]
    batch = prepare_batch(images, InputSpec(size, size, 1))
    for image, row in zip(images, batch):
        reference = tf.image.resize(tf.cast(image[..., np.newaxis], tf.float32), (size, size), method="bilinear",
                                    antialias=True)
        np.testing.assert_allclose(np.clip(reference.numpy(), 0, 255), row, atol=SAME_RESIZE_GREY)


@pytest.mark.parametrize("bad", [np.zeros((0, 5)), np.zeros((4, 4, 3)), np.zeros(10)])
def test_prepare_batch_rejects_non_grey_images(bad):
    with pytest.raises(ValueError, match="image 0"):
        prepare_batch([bad], InputSpec(32, 32, 1))


@needs_data
def test_training_pipeline_and_inference_give_the_same_tensor():
    from training.pipeline import image_dataset

    image = read_grey_image(BRAIN_IMAGE)
    spec = InputSpec(128, 128, 1)
    (x, y), = list(image_dataset([image], np.array([2]), 4, spec, batch_size=1).take(1))
    np.testing.assert_array_equal(x.numpy(), prepare_batch([image], spec))
    np.testing.assert_array_equal(y.numpy(), [[0, 0, 1, 0]])


@needs_data
def test_read_grey_image_converts_colour_files(tmp_path):
    grey = read_grey_image(COVID_RGBA)
    assert grey.ndim == 2 and grey.dtype == np.uint8
    from PIL import Image

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(rgb)
    np.testing.assert_array_equal(read_grey_image(rgb), grey)


def test_read_grey_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageFileError, match="missing.png: file does not exist"):
        read_grey_image(missing)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageFileError, match="junk.jpg: not a readable image"):
        read_grey_image(junk)
