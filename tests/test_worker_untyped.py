"""The worker's path withholds a tumour's type where the model cannot assess it, on a sequence the model's tumour
classes were not learned from (DICOM made at test time from the data set's glioma images, once with a T1 spin-echo
header and once with a FLAIR header), and a finding where the model cannot tell it from normal anatomy, pituitary
on an axial post-contrast series (the data set's pituitary images with and without a contrast agent, axial and
coronal): through :func:`worker.inference.classify_series_files` and the shipped brain model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_factory import sample_images, write_files
from dicom_io.synthesis import mr_series
from models.inference import Classifier, default_model_dir
from models.tasks import BRAIN_TUMOR, COVID_CT, INDETERMINATE
from worker.decoding import decode_series, finding_caveats, prepare_series, type_caveats
from worker.inference import classify_series_files

SLICES = 12


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load(default_model_dir(BRAIN_TUMOR.name))


def _series(directory: Path, images: str = "glioma", **header: object) -> list[Path]:
    datasets = mr_series(sample_images(f"brain-tumor-mri/Testing/{images}/*.jpg", SLICES, seed=7))
    for ds in datasets:
        for keyword, value in header.items():
            setattr(ds, keyword, value)
    return write_files(datasets, directory)


def test_a_flair_tumour_series_is_a_tumour_of_no_stated_type(tmp_path: Path, classifier: Classifier) -> None:
    t1 = classify_series_files(_series(tmp_path / "t1"), classifier, 32)  # the synthesis' T1 spin echo
    assert t1.label in BRAIN_TUMOR.finding_classes and t1.reason is None, t1
    flair = classify_series_files(
        _series(tmp_path / "flair", ScanningSequence=["SE", "IR"], RepetitionTime=9000.0, EchoTime=120.0,
                InversionTime=2500.0), classifier, 32)
    assert flair.label == BRAIN_TUMOR.untyped_finding, flair
    assert flair.reason == ("type not assessed: a FLAIR (inversion time 2500 ms) series, and the model learned the "
                            "types from T1-weighted post-contrast images only")
    # The same pixels: the same probabilities, only the label differs.
    assert flair.probabilities == t1.probabilities


def test_the_caveat_travels_with_the_prepared_series(tmp_path: Path, classifier: Classifier) -> None:
    paths = _series(tmp_path, ScanningSequence="SE", RepetitionTime=4000.0, EchoTime=100.0)
    prepared = prepare_series(paths, BRAIN_TUMOR.name, classifier.card.input_spec)
    assert set(prepared.type_caveats) == set(BRAIN_TUMOR.finding_classes)
    assert all("T2-weighted (echo time 100 ms)" in caveat for caveat in prepared.type_caveats.values())
    # The COVID model has no types to withhold.
    assert type_caveats([dcmread(paths[0])], COVID_CT) == {}
    assert finding_caveats([dcmread(paths[0])], decode_series(paths, COVID_CT), COVID_CT) == {}


def test_pituitary_on_an_axial_post_contrast_series_is_indeterminate(tmp_path: Path, classifier: Classifier) -> None:
    # The synthesis' "AX T1 POST": axial, Contrast/Bolus Agent GADOLINIUM.
    post = classify_series_files(_series(tmp_path / "post", "pituitary"), classifier, 32)
    assert post.label == INDETERMINATE, post
    assert post.reason == ("finding not assessed: an axial post-contrast series: the model's axial pituitary images "
                           "are post-contrast slices, and it calls normally enhancing anatomy pituitary (on two real "
                           "glioblastoma series, slices without a pituitary tumour), so it cannot tell a pituitary "
                           "finding here")
    assert max(post.probabilities, key=post.probabilities.get) == "pituitary"  # the model's figures stay on record
    # Without a contrast agent, or cut coronally (the sella's own planes), the type stands.
    plain = classify_series_files(_series(tmp_path / "plain", "pituitary", ContrastBolusAgent=""), classifier, 32)
    coronal = classify_series_files(_series(tmp_path / "coronal", "pituitary",
                                            ImageOrientationPatient=[1, 0, 0, 0, 0, -1]), classifier, 32)
    assert (plain.label, plain.reason) == (coronal.label, coronal.reason) == ("pituitary", None)
    assert plain.probabilities == post.probabilities
    # Other types on an axial post-contrast series are given.
    glioma = classify_series_files(_series(tmp_path / "glioma"), classifier, 32)
    assert glioma.label in BRAIN_TUMOR.finding_classes and glioma.label != "pituitary" and glioma.reason is None
