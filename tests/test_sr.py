"""dicom_io.sr: the TID 1500 classification SR, checked with dicom3tools' dciodvfy, dcmtk's dsrdump and highdicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.codes import class_concept
from dicom_io.sr import (
    AlgorithmInfo,
    ClassificationResult,
    SRError,
    build_classification_sr,
    describe,
    read_classification_sr,
    sr_uids,
)

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"

BRAIN = ClassificationResult(
    task="brain-tumor",
    label="meningioma",
    class_names=("glioma", "meningioma", "notumor", "pituitary"),
    probabilities=(0.05, 0.8123456789012345, 0.1, 0.0376543210987655),
)
COVID = ClassificationResult(
    task="covid-ct", label="non-COVID", class_names=("COVID", "non-COVID"), probabilities=(0.25, 0.75)
)
MODEL = AlgorithmInfo(
    name="brain-tumor-efficientnet",
    version="1.2.0",
    uid="2.25.123456789012345678901234567890",
    manufacturer="dicom-triage",
    parameters=(("aggregation", "mean of slice probabilities"),),
)


def _series(modality: str, count: int = 3, **attributes: object) -> list[Dataset]:
    """A small source series with realistic patient/study headers (tiny pixel data: the SR never reads it)."""
    study, series = generate_uid(), generate_uid()
    slices = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "P123", "19700101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240301", "101500", "S1", "ACC1"
        ds.ReferringPhysicianName, ds.StudyDescription = "Smith^John", "MR head"
        ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "ACME", 3, index + 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        slices.append(ds)
    return slices


def _save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert (run.returncode == 0) == (not errors), run.stdout + run.stderr
    return errors


@pytest.mark.parametrize("modality,result", [("MR", BRAIN), ("CT", COVID)], ids=["brain", "covid"])
def test_first_and_revised_srs_are_valid_render_and_read_back(
    tmp_path: Path, modality: str, result: ClassificationResult
) -> None:
    sources = _series(modality)
    first = build_classification_sr(sources, result, MODEL)
    revised_result = ClassificationResult(
        result.task, result.class_names[0], result.class_names, result.probabilities[::-1]
    )
    revised = build_classification_sr(sources, revised_result, MODEL, revision=1, predecessor=first)
    for name, sr, expected in (("first", first, result), ("revised", revised, revised_result)):
        path = _save(sr, tmp_path / f"{name}.dcm")
        assert _dciodvfy_errors(path) == []
        dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert "Comprehensive 3D SR" in dump.stdout and "UNVERIFIED" in dump.stdout
        assert class_concept(expected.label).meaning in dump.stdout
        report = read_classification_sr(pydicom.dcmread(path))
        assert report.finding == expected.label
        assert report.probabilities == expected.probability_by_class  # exact: FloatingPointValue travels with DS
        assert report.task == expected.task
        assert report.algorithm == MODEL
        assert report.referenced_instances == tuple((s.SOPClassUID, s.SOPInstanceUID) for s in sources)
    assert read_classification_sr(revised).predecessors == (first.SOPInstanceUID,)
    dump = subprocess.run([DSRDUMP, str(tmp_path / "revised.dcm")], capture_output=True, text=True, timeout=60)
    assert "Predecessor Docs" in dump.stdout


def test_document_header_follows_the_source_and_ihe_air(tmp_path: Path) -> None:
    sources = _series("MR", count=4)
    sr = pydicom.dcmread(_save(build_classification_sr(sources, BRAIN, MODEL), tmp_path / "sr.dcm"))
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID and sr.Modality == "SR"
    copied = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate")
    for keyword in copied:
        assert sr[keyword].value == sources[0][keyword].value, keyword
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    (study_item,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series_item.ReferencedSOPSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    model_items = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID") == MODEL.uid]
    assert len(model_items) == 1
    assert model_items[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert model_items[0].SoftwareVersions == MODEL.version and model_items[0].ManufacturerModelName == MODEL.name


def test_uids_are_derived_from_series_model_and_revision() -> None:
    sources = _series("CT")
    again = build_classification_sr(sources, COVID, MODEL)
    first = build_classification_sr(sources, COVID, MODEL)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (first.SOPInstanceUID, first.SeriesInstanceUID)
    revised = build_classification_sr(sources, COVID, MODEL, revision=1, predecessor=first)
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID and revised.SOPInstanceUID != first.SOPInstanceUID
    other_model = sr_uids(sources[0].SeriesInstanceUID, "2.25.99", 0)
    assert other_model.sop_instance_uid != first.SOPInstanceUID
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID, other_model.tracking_uid):
        assert pydicom.uid.UID(uid).is_valid and uid.startswith("2.25.")


def test_missing_patient_and_study_attributes_still_give_a_valid_sr(tmp_path: Path) -> None:
    missing = dict.fromkeys(
        ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
         "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "Manufacturer"),
    )
    sources = _series("MR", **missing)
    path = _save(build_classification_sr(sources, BRAIN, MODEL), tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.PatientID == "" and sr.PatientName == "" and sr.StudyDate == ""


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_invalid_source_values_are_emptied_not_copied(tmp_path: Path) -> None:
    sources = _series("MR", StudyDate="2024-13-45", StudyTime="25:99", PatientSex="female", PatientBirthDate="19700231")
    path = _save(build_classification_sr(sources, BRAIN, MODEL), tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert (sr.StudyDate, sr.StudyTime, sr.PatientSex, sr.PatientBirthDate) == ("", "", "", "")


def test_non_ascii_names_are_kept_in_utf8(tmp_path: Path) -> None:
    sources = _series(
        "MR",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Müller^Jürgen=山田^太郎",
        ReferringPhysicianName="Åström^Øyvind",
    )
    path = _save(build_classification_sr(sources, BRAIN, MODEL), tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Jürgen=山田^太郎" and str(sr.ReferringPhysicianName) == "Åström^Øyvind"
    assert "Müller" in describe(path)
    dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Müller^Jürgen" in dump.stdout


@pytest.mark.filterwarnings("ignore:The (value|PN component) length")
def test_overlong_values_are_truncated_to_their_vr(tmp_path: Path) -> None:
    sources = _series(
        "CT",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Ä" * 40 + "^" + "B" * 100,
        PatientID="9" * 100,
        StudyDescription="CT chest " * 40,
        AccessionNumber="A" * 40,
    )
    path = _save(build_classification_sr(sources, COVID, MODEL), tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert len(str(sr.PatientName).encode()) <= 64
    assert sr.PatientName.family_name.startswith("ÄÄ") and sr.PatientName.given_name.startswith("BB")
    assert sr.PatientID == "9" * 64 and sr.AccessionNumber == "A" * 16
    assert len(sr.StudyDescription.encode()) <= 64


def test_bad_inputs_are_refused_with_a_reason() -> None:
    sources = _series("MR")
    with pytest.raises(SRError, match="StudyInstanceUID"):
        build_classification_sr(_series("MR", StudyInstanceUID=None), BRAIN, MODEL)
    with pytest.raises(SRError, match="more than one series"):
        build_classification_sr(sources + _series("MR"), BRAIN, MODEL)
    with pytest.raises(SRError, match="predecessor"):
        build_classification_sr(sources, BRAIN, MODEL, revision=1)
    with pytest.raises(SRError, match="no source"):
        build_classification_sr([], BRAIN, MODEL)
    with pytest.raises(SRError, match="not a valid DICOM UID"):
        build_classification_sr(sources, BRAIN, AlgorithmInfo("m", "1", "model-7", "x"))
    with pytest.raises(ValueError, match="label"):
        ClassificationResult("brain-tumor", "astrocytoma", BRAIN.class_names, BRAIN.probabilities)
    with pytest.raises(ValueError, match="probabilities"):
        ClassificationResult("brain-tumor", "glioma", BRAIN.class_names, (0.5, 0.5, float("nan"), 0.0))
    with pytest.raises(KeyError, match="known"):
        build_classification_sr(sources, ClassificationResult("brain-tumor", "x", ("x", "y"), (0.5, 0.5)), MODEL)


def test_reader_refuses_what_is_not_a_classification_sr(tmp_path: Path) -> None:
    with pytest.raises(SRError, match="not a Comprehensive 3D SR"):
        read_classification_sr(_series("MR")[0])
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"hello, not DICOM")
    with pytest.raises(SRError, match="cannot read"):
        describe(not_dicom)


def test_describe_summarises_finding_probabilities_model_and_images(tmp_path: Path) -> None:
    sources = _series("CT", count=2)
    text = describe(_save(build_classification_sr(sources, COVID, MODEL), tmp_path / "sr.dcm"))
    assert "Finding: non-COVID" in text and "0.7500" in text and "0.2500" in text
    assert MODEL.name in text and MODEL.uid in text and "aggregation = mean of slice probabilities" in text
    assert all(s.SOPInstanceUID in text for s in sources)


INDETERMINATE_COVID = ClassificationResult(
    task="covid-ct", label="indeterminate", class_names=("COVID", "non-COVID"), probabilities=(0.4, 0.6),
    reason="no lung in the field of view (12 of 40 slices)",
)


def test_indeterminate_result_reports_undetermined_with_its_reason(tmp_path: Path) -> None:
    sources = _series("CT")
    first = build_classification_sr(sources, INDETERMINATE_COVID, MODEL)
    path = _save(first, tmp_path / "indeterminate.dcm")
    assert _dciodvfy_errors(path) == []
    dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert '"Finding")=(373068000,SCT,"Undetermined")' in dump.stdout
    assert '<contains TEXT:(,,"Comment")="no lung in the field of vie' in dump.stdout  # dsrdump cuts long text
    report = read_classification_sr(pydicom.dcmread(path))
    assert report.finding == "indeterminate" and report.reason == INDETERMINATE_COVID.reason
    assert report.probabilities == {"COVID": 0.4, "non-COVID": 0.6}  # every class' probability stays
    text = describe(path)
    assert "Finding: indeterminate" in text and f"Reason: {INDETERMINATE_COVID.reason}" in text
    assert "0.6000" in text

    # A radiologist's correction to a class: the revision reports the class, and no reason.
    corrected = ClassificationResult("covid-ct", "COVID", INDETERMINATE_COVID.class_names, (0.4, 0.6))
    revised = build_classification_sr(sources, corrected, MODEL, revision=1, predecessor=first)
    revised_path = _save(revised, tmp_path / "revised.dcm")
    assert _dciodvfy_errors(revised_path) == []
    report = read_classification_sr(pydicom.dcmread(revised_path))
    assert (report.finding, report.reason, report.predecessors) == ("COVID", None, (first.SOPInstanceUID,))
    assert "Reason:" not in describe(revised_path)


def test_indeterminate_reason_rules() -> None:
    names = INDETERMINATE_COVID.class_names
    with pytest.raises(ValueError, match="reason is for an 'indeterminate' result or an untyped finding"):
        ClassificationResult("covid-ct", "COVID", names, (0.4, 0.6), reason="no lung")
    with pytest.raises(SRError, match="reason is empty"):
        build_classification_sr(_series("CT"), ClassificationResult("covid-ct", "indeterminate", names, (0.4, 0.6),
                                                                    reason=" \n "), MODEL)
    # Without a reason the finding is still reported, and reads back without one.
    bare = build_classification_sr(_series("CT"), ClassificationResult("covid-ct", "indeterminate", names,
                                                                        (0.4, 0.6)), MODEL)
    report = read_classification_sr(bare)
    assert (report.finding, report.reason) == ("indeterminate", None)


def test_untyped_finding_reports_neoplasm_of_brain_with_its_reason(tmp_path: Path) -> None:
    reason = "type not assessed: a FLAIR (inversion time 2200 ms) series"
    names = ("glioma", "meningioma", "notumor", "pituitary")
    result = ClassificationResult("brain-tumor", "tumor", names, (0.25, 0.55, 0.1, 0.1), reason=reason)
    path = _save(build_classification_sr(_series("MR"), result, MODEL), tmp_path / "untyped.dcm")
    assert _dciodvfy_errors(path) == []
    dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert '"Finding")=(126952004,SCT,"Neoplasm of brain")' in dump.stdout
    report = read_classification_sr(pydicom.dcmread(path))
    assert (report.finding, report.reason) == ("tumor", reason)
    assert report.probabilities == dict(zip(names, (0.25, 0.55, 0.1, 0.1)))
    # Only known labels: an untyped finding no task defines is refused like an unknown class.
    with pytest.raises(ValueError, match="is not one of"):
        ClassificationResult("brain-tumor", "lesion", names, (0.25, 0.55, 0.1, 0.1), reason=reason)
