"""dicom_io.imaging on synthetic series (dicom_io.synthesis) in every transfer syntax the listener accepts.

The series are made at test time from real training images in ../shared/data: MR as 12-bit values, CT in
Hounsfield units. Lossless encodings must display exactly like the native one; lossy ones within measured bounds.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, UID

from dicom_io import synthesis
from dicom_io.imaging import display_frames, series_frames

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATTERNS = {"MR": "brain-tumor-mri/Testing/*/*.jpg", "CT": "covid-ct/*/*.png"}
# Mean absolute error (grey levels) allowed against the native display, per lossy syntax. Measured on these
# images: JPEG Extended 0.2 (MR) / 0.5 (CT), JPEG-LS near-lossless (error 2) 0.1 / 0.2, JPEG 2000 at 10:1 2.3 / 3.6.
LOSSY_MEAN_ERROR = {JPEGExtended12Bit: 1.0, JPEGLSNearLossless: 0.5, JPEG2000: 6.0}


def _images(modality: str, count: int = 3) -> list[Path]:
    files = sorted(SHARED_DATA.glob(PATTERNS[modality]))
    if not files:
        pytest.skip(f"no training images under {SHARED_DATA}")
    return random.Random(5).sample(files, count)


@pytest.fixture(scope="module", params=["MR", "CT"])
def native(request: pytest.FixtureRequest) -> tuple[str, list, list[np.ndarray]]:
    paths = _images(request.param)
    series = synthesis.mr_series(paths) if request.param == "MR" else synthesis.ct_series(paths)
    return request.param, series, [display_frames(ds)[0] for ds in series]


# JPEG Baseline carries 8-bit data only; 12-bit MR and CT use JPEG Extended instead.
SYNTAXES = [s for s in synthesis.TRANSFER_SYNTAXES if s != JPEGBaseline8Bit]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[UID(s).name for s in SYNTAXES])
def test_every_transfer_syntax_displays_like_the_native_encoding(native, syntax: UID) -> None:
    modality, series, expected = native
    shown = series_frames(synthesis.encode(ds, syntax) for ds in series)
    assert len(shown) == len(expected)
    if syntax in synthesis.LOSSLESS_TRANSFER_SYNTAXES:
        for got, want in zip(shown, expected):
            np.testing.assert_array_equal(got, want)
    else:
        errors = [float(np.abs(got - want).mean()) for got, want in zip(shown, expected)]
        assert max(errors) < LOSSY_MEAN_ERROR[syntax], (modality, errors)


def test_synthetic_ct_shows_the_training_image() -> None:
    # MR has no absolute scale (see test_imaging's MR round trip); CT in HU comes back through the lung window.
    paths = _images("CT")
    for path, image in zip(paths, series_frames(synthesis.ct_series(paths))):
        assert np.abs(image - synthesis.load_grey(path)).max() <= 0.5


def test_monochrome1_mr_shows_the_same_picture_as_monochrome2() -> None:
    paths = _images("MR")
    normal = series_frames(synthesis.mr_series(paths))
    inverted = series_frames(synthesis.mr_series(paths, monochrome1=True))
    for a, b in zip(normal, inverted):
        np.testing.assert_allclose(a, b, atol=1e-3)
