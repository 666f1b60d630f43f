"""``dicom_io.mr.mr_weighting``: the weighting an MR header shows plainly, from its physics (echo, inversion and
repetition times, the pulse sequence), on classic and enhanced MR, and on the development set's real series."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_io.mr import FLUID_NULLING_TI_MS, LONG_GRADIENT_TE_MS, LONG_TE_MS, LONG_TR_MS, mr_weighting
from dicom_io.synthesis import mr_series, multiframe_mr

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dicom-dev"


def classic(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    for keyword, value in attributes.items():
        if isinstance(value, bytes):  # undecoded, as pydicom holds an element read from a file until it is used
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("attributes", "expected"), [
    # REMBRANDT's axial FLAIR (its Scanning Sequence is the non-standard "flair"): the inversion time says it.
    ({"ScanningSequence": "flair", "RepetitionTime": 10004, "EchoTime": 155, "InversionTime": 2200},
     "FLAIR (inversion time 2200 ms)"),
    ({"ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "EchoTime": 90, "InversionTime": 2500}, "FLAIR"),
    ({"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 100}, "T2-weighted (echo time 100 ms)"),
    ({"ScanningSequence": ["SE", "EP"], "RepetitionTime": 10000, "EchoTime": 79}, "echo-planar"),  # a DTI b0
    ({"ScanningSequence": ["EP", "GR"], "RepetitionTime": 2000, "EchoTime": 30}, "echo-planar"),  # fMRI
    ({"ScanningSequence": "GR", "RepetitionTime": 650, "EchoTime": 20}, "T2*-weighted"),
    ({"ScanningSequence": "SE", "RepetitionTime": 3000, "EchoTime": 15}, "proton density-weighted"),
])
def test_a_weighting_other_than_t1_is_named_with_its_figure(attributes: dict[str, object], expected: str) -> None:
    weighting = mr_weighting(classic(**attributes))
    assert weighting is not None
    assert weighting.describe() == expected or weighting.name == expected


@pytest.mark.parametrize("attributes", [
    {"ScanningSequence": "SE", "RepetitionTime": 550, "EchoTime": 12},  # T1 spin echo (post-contrast or not)
    {"ScanningSequence": ["GR", "IR"], "RepetitionTime": 2000, "EchoTime": 2.52, "InversionTime": 900},  # MPRAGE
    {"ScanningSequence": "GR", "RepetitionTime": 8.6, "EchoTime": 4.11},  # RIDER's T1 gradient echo
    {"ScanningSequence": ["SE", "IR"], "RepetitionTime": 6000, "EchoTime": 30, "InversionTime": 150},  # STIR
    {"ScanningSequence": "SE", "RepetitionTime": 4000},  # no echo time: nothing shown plainly
    {"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": b"abc "},  # malformed, as read from a file
    {"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 0},
    {},
])
def test_t1_and_headers_without_the_figures_are_none(attributes: dict[str, object]) -> None:
    assert mr_weighting(classic(**attributes)) is None


def test_thresholds_sit_between_t1_and_the_others() -> None:
    assert mr_weighting(classic(ScanningSequence="SE", EchoTime=LONG_TE_MS)).name == "T2-weighted"
    assert mr_weighting(classic(ScanningSequence="SE", RepetitionTime=500, EchoTime=LONG_TE_MS - 1)) is None
    assert mr_weighting(classic(ScanningSequence="GR", EchoTime=LONG_GRADIENT_TE_MS)).name == "T2*-weighted"
    assert mr_weighting(classic(ScanningSequence="GR", EchoTime=LONG_GRADIENT_TE_MS - 1)) is None
    assert mr_weighting(classic(ScanningSequence="IR", EchoTime=10, InversionTime=FLUID_NULLING_TI_MS)).name \
        == "FLAIR"
    assert mr_weighting(classic(ScanningSequence="IR", EchoTime=10, InversionTime=FLUID_NULLING_TI_MS - 1)) is None
    assert mr_weighting(classic(ScanningSequence="SE", RepetitionTime=LONG_TR_MS, EchoTime=10)).name \
        == "proton density-weighted"
    assert mr_weighting(classic(ScanningSequence="SE", RepetitionTime=LONG_TR_MS - 1, EchoTime=10)) is None


def test_other_modalities_are_none() -> None:
    ct = classic(ScanningSequence="SE", EchoTime=100)
    ct.Modality = "CT"
    assert mr_weighting(ct) is None


def _enhanced(echo: float, inversion: float | None = None, echo_planar: bool = False) -> Dataset:
    """An Enhanced MR object of three synthetic slices with its echo and inversion in the shared functional
    groups (where the standard puts them, not in the top-level attributes)."""
    ds = multiframe_mr(mr_series([[[i * 10] * 8] * 8 for i in range(1, 4)]))
    for keyword in ("EchoTime", "InversionTime", "ScanningSequence", "RepetitionTime"):
        if keyword in ds:
            delattr(ds, keyword)
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.MREchoSequence = [Dataset()]
    shared.MREchoSequence[0].EffectiveEchoTime = echo
    shared.MRModifierSequence = [Dataset()]
    shared.MRModifierSequence[0].InversionRecovery = "YES" if inversion else "NO"
    if inversion:
        shared.MRModifierSequence[0].InversionTimes = [inversion]
    ds.EchoPlanarPulseSequence = "YES" if echo_planar else "NO"
    return ds


def test_enhanced_mr_reads_the_functional_groups() -> None:
    assert mr_weighting(_enhanced(echo=120.0)).name == "T2-weighted"
    assert mr_weighting(_enhanced(echo=90.0, inversion=2400.0)).describe() == "FLAIR (inversion time 2400 ms)"
    assert mr_weighting(_enhanced(echo=40.0, echo_planar=True)).name == "echo-planar"
    assert mr_weighting(_enhanced(echo=3.0, inversion=900.0)) is None  # an MPRAGE


def test_the_development_sets_real_series() -> None:
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is missing")
    found: dict[str, str | None] = {}
    for path in sorted(p for p in REAL.rglob("*") if p.is_file() and p.suffix in ("", ".dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.get("Modality") == "MR":
            weighting = mr_weighting(ds)
            found.setdefault(str(path.relative_to(REAL)).split("/")[1], weighting.name if weighting else None)
    # Canon's DTI b0 is echo-planar; the XA30 T1 volumes (enhanced MR) and RIDER's T1 gradient echo are T1.
    assert found == {"dcm_qa_canon_61": "echo-planar", "dcm_qa_xa30": None, "dbdicom-rider": None}, found
