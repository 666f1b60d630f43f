"""Write a classification result as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom).

The document follows the IHE AI Results (AIR) profile's shape:

* Observation context: the model is the observer device (Device Observer UID = the model card's UID).
* Procedure reported: brain MRI or CT chest (:mod:`dicom_io.codes`).
* One TID 1501 measurement group for the classified series: tracking identifier and UID, algorithm identification
  (name, version, parameters, plus the task and the class names in output order so a reader can map the codes back),
  finding site, every source image, the "Finding" item (DCM 121071) whose value is the predicted class' concept
  (SNOMED CT 373068000 "Undetermined" for an indeterminate result, followed by a TEXT item DCM 121106 "Comment"
  saying why: :mod:`dicom_io.codes`), and one probability measurement per class (kept for an indeterminate result).
* Patient and study copied from the source (cleaned so the SR stays valid, see :func:`_patient_and_study`); the same
  Study Instance UID and a new series; the evidence sequence lists every source instance; VerificationFlag
  UNVERIFIED; ContributingEquipmentSequence names the model as processing equipment with its Device UID.
* UIDs are derived from (source series, model UID, revision), so a retried task writes the same SR again instead of
  a second one; a later revision names its predecessor.
"""

from __future__ import annotations

import importlib.metadata
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_io.codes import (
    PROBABILITY_UNIT,
    REASON_CONCEPT,
    class_concept,
    finding_concept,
    finding_site_concept,
    procedure_concept,
)
from dicom_io.sr.results import AlgorithmInfo, ClassificationResult

__all__ = ["SRError", "SRUids", "sr_uids", "build_classification_sr", "TASK_PARAMETER", "CLASSES_PARAMETER"]

#: Algorithm parameters the writer adds so that a reader can tell which class each code stands for.
TASK_PARAMETER = "task"
CLASSES_PARAMETER = "class_names"

# Fixed namespace for UUID5-derived UIDs (2.25.<uuid as integer>, PS3.5 B.2). Never change it: retries and
# revisions rely on getting the same UIDs for the same inputs.
_UID_NAMESPACE = uuid.UUID("5d0f8a43-3a4c-4f57-9d1e-5b3c2f0e7a61")

# Maximum value lengths in bytes (PS3.5 table 6.2-1); PN applies per component group.
_MAX_BYTES = {"PN": 64, "LO": 64, "SH": 16, "CS": 16}
# Digits and dots. Leading zeros in a component are invalid but common in old devices' UIDs: references must copy
# them exactly, so they are accepted.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, and backslash (the value separator)


class SRError(ValueError):
    """The inputs cannot make a valid SR; the message says why."""


@dataclass(frozen=True)
class SRUids:
    """The UIDs of the SR for one (source series, model, revision)."""

    series_instance_uid: str
    sop_instance_uid: str
    tracking_uid: str


def _derived_uid(*parts: str) -> str:
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, "\x00".join(parts)).int)


def sr_uids(source_series_uid: str, model_uid: str, revision: int) -> SRUids:
    """Deterministic UIDs: the SR series and tracking UID stay the same across revisions, the instance does not."""
    if revision < 0:
        raise SRError(f"revision must be >= 0, got {revision}")
    return SRUids(
        series_instance_uid=_derived_uid("sr-series", source_series_uid, model_uid),
        sop_instance_uid=_derived_uid("sr-instance", source_series_uid, model_uid, str(revision)),
        tracking_uid=_derived_uid("tracking", source_series_uid, model_uid),
    )


def build_classification_sr(
    source_datasets: Sequence[Dataset],
    result: ClassificationResult,
    algorithm: AlgorithmInfo,
    revision: int = 0,
    predecessor: Dataset | None = None,
    *,
    series_number: int = 990,
    manufacturer: str = "dicom-triage",
    software_version: str | None = None,
    device_serial_number: str = "1",
) -> hd.sr.Comprehensive3DSR:
    """Build the SR reporting ``result`` for the series made of ``source_datasets``.

    ``source_datasets`` are the classified instances (headers suffice: pixel data is not read). ``revision`` 0 is
    the first SR for this (series, model); a later one passes the SR it replaces as ``predecessor``.
    ``manufacturer``, ``software_version`` (default: the installed dicom-triage version) and
    ``device_serial_number`` describe the system writing the SR.
    Raises :class:`SRError` for inputs no valid SR can be made from.
    """
    if not source_datasets:
        raise SRError("no source instances to report on")
    if (predecessor is None) != (revision == 0):
        raise SRError("a revision > 0 needs its predecessor SR, and revision 0 has none")
    if not _is_uid(algorithm.uid):
        raise SRError(f"the model UID {algorithm.uid!r} is not a valid DICOM UID")
    headers = _evidence_headers(source_datasets)
    study_uid, series_uid = headers[0].StudyInstanceUID, headers[0].SeriesInstanceUID
    if predecessor is not None and predecessor.get("StudyInstanceUID") != study_uid:
        raise SRError("the predecessor SR belongs to another study")
    uids = sr_uids(series_uid, algorithm.uid, revision)
    character_set = "ISO_IR 192" if _needs_unicode(headers[0]) else None

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid,
            identifier=_fit(f"{result.task} classification of series {series_uid}", "LO"),
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=_fit(algorithm.name, "LO"),
            version=_fit(algorithm.version, "LO"),
            parameters=[
                f"{TASK_PARAMETER}={result.task}",
                f"{CLASSES_PARAMETER}={','.join(result.class_names)}",
                *(f"{key}={value}" for key, value in algorithm.parameters),
            ],
        ),
        finding_sites=[hd.sr.FindingSite(anatomic_location=finding_site_concept(result.task))],
        # The TID 1501 "Finding" item (DCM 121071) carries the predicted class; highdicom calls it finding_type.
        finding_type=finding_concept(result.label),
        measurements=[
            hd.sr.Measurement(name=class_concept(name), value=probability, unit=PROBABILITY_UNIT)
            for name, probability in zip(result.class_names, result.probabilities)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(h.SOPClassUID, h.SOPInstanceUID) for h in headers
        ],
    )
    if result.reason is not None:
        _add_reason(group, result.reason)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.uid,
            name=_fit(algorithm.name, "LO"),
            manufacturer_name=_fit(algorithm.manufacturer, "LO"),
            model_name=_fit(f"{algorithm.name} {algorithm.version}", "LO"),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_concept(result.task),
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    # IHE AIR's "Processing Algorithm" purpose is no concept of PS3.16 CID 7005 (Contributing Equipment Purposes of
    # Reference); Processing Equipment (DCM 109102) is the closest. The Device UID identifies the model, as AIR
    # asks, although dciodvfy warns that the sequence's definition does not list it.
    equipment = hd.ContributingEquipment(
        manufacturer=_fit(algorithm.manufacturer, "LO"),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_fit(algorithm.name, "LO"),
        software_versions=_fit(algorithm.version, "LO"),
        contribution_description=f"AI classification: {result.task}",
    )
    equipment.DeviceUID = algorithm.uid
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=revision + 1,
        manufacturer=_fit(manufacturer, "LO"),
        manufacturer_model_name=_fit(manufacturer, "LO"),
        software_versions=_fit(software_version or _own_version(), "LO"),
        device_serial_number=_fit(device_serial_number, "LO"),
        series_description=_fit(f"AI {result.task} classification", "LO"),
        is_complete=True,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[equipment],
        specific_character_set=character_set,
    )


def _add_reason(group: hd.sr.MeasurementsAndQualitativeEvaluations, reason: str) -> None:
    """Put the TEXT item saying why the finding is indeterminate (or has no type) right after the Finding item.

    highdicom's group takes coded qualitative evaluations only, so the item is added to the built container. One
    line of text: the reason is shown beside the finding, and a reader should not have to unwrap it.
    """
    text = " ".join(reason.split())
    if not text:
        raise SRError("the result's reason is empty")
    item = hd.sr.TextContentItem(
        name=REASON_CONCEPT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    content = group[0].ContentSequence
    finding_code = codes.DCM.Finding.value
    position = next(
        (i + 1 for i, child in enumerate(content) if child.ConceptNameCodeSequence[0].CodeValue == finding_code),
        len(content),
    )
    content.insert(position, item)


def _own_version() -> str:
    try:
        return importlib.metadata.version("dicom-triage")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _evidence_headers(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """One small header per distinct source instance; the first also carries the cleaned patient and study."""
    headers: dict[str, Dataset] = {}
    for ds in source_datasets:
        header = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(keyword, "") or "").strip()
            if not _is_uid(value):
                raise SRError(f"a source instance has no valid {keyword} ({value!r})")
            setattr(header, keyword, value)
        headers.setdefault(header.SOPInstanceUID, header)
    ordered = list(headers.values())
    if len({(h.StudyInstanceUID, h.SeriesInstanceUID) for h in ordered}) != 1:
        raise SRError("the source instances belong to more than one series")
    ordered[0].update(_patient_and_study(source_datasets[0]))
    return ordered


def _patient_and_study(source: Dataset) -> Dataset:
    """Patient, study and acquisition-equipment attributes of ``source``, made valid.

    Missing type 2 attributes become empty; values too long for their VR are cut at a character boundary; dates,
    times, sex and age that do not parse are emptied (or left out when optional). Nothing invalid is copied, so the
    SR stays valid whatever the source holds.
    """
    out = Dataset()
    for keyword in ("PatientName", "ReferringPhysicianName"):
        setattr(out, keyword, _fit_person_name(source.get(keyword)))
    for keyword, vr in (("PatientID", "LO"), ("StudyID", "SH"), ("AccessionNumber", "SH")):
        setattr(out, keyword, _fit(source.get(keyword), vr))
    out.PatientBirthDate = _valid_date(source.get("PatientBirthDate"))
    out.StudyDate = _valid_date(source.get("StudyDate"))
    out.StudyTime = _valid_time(source.get("StudyTime"))
    sex = str(source.get("PatientSex", "") or "").strip().upper()
    out.PatientSex = sex if sex in ("M", "F", "O") else ""
    age = str(source.get("PatientAge", "") or "").strip()
    if re.fullmatch(r"\d{3}[DWMY]", age):
        out.PatientAge = age
    optional = ("IssuerOfPatientID", "StudyDescription", "Manufacturer", "ManufacturerModelName", "InstitutionName")
    for keyword in optional:
        value = _fit(source.get(keyword), "LO")
        if value:
            setattr(out, keyword, value)
    return out


def _fit(value: object, vr: str) -> str:
    """``value`` as one text value of ``vr``: no control characters or backslashes, at most the VR's byte length."""
    text = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    return _truncate(text, _MAX_BYTES[vr])


def _fit_person_name(value: object) -> str:
    """A PN value of at most three groups, five components each, at most 64 bytes in all.

    PS3.5 allows 64 per component group, but dciodvfy checks the whole value against 64, so the stricter limit
    keeps every validator quiet. An overlong name loses characters from its longest component first (in any
    group), so family and given names, alphabetic and ideographic, all survive.
    """
    text = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    groups = [[c.strip() for c in group.split("^")[:5]] for group in text.split("=")[:3]]

    def joined() -> str:
        return "=".join("^".join(components).rstrip("^") for components in groups).rstrip("=")

    while len(joined().encode("utf-8")) > _MAX_BYTES["PN"]:
        g, i = max(
            ((g, i) for g, components in enumerate(groups) for i in range(len(components))),
            key=lambda gi: len(groups[gi[0]][gi[1]].encode("utf-8")),
        )
        groups[g][i] = groups[g][i][:-1]
    return joined()


def _truncate(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore").rstrip()


def _valid_date(value: object) -> str:
    text = str(value or "").strip()
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return ""
    return text if re.fullmatch(r"\d{8}", text) else ""


def _valid_time(value: object) -> str:
    text = str(value or "").strip()
    match = re.fullmatch(r"([01]\d|2[0-3])(([0-5]\d)(([0-5]\d)(\.\d{1,6})?)?)?", text)
    return text if match else ""


def _is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.fullmatch(text) is not None


def _needs_unicode(header: Dataset) -> bool:
    return any(not str(element.value).isascii() for element in header)
