"""Read back the classification SRs that :mod:`dicom_io.sr.writer` makes (highdicom), and summarise them."""

from __future__ import annotations

from os import PathLike

import highdicom as hd
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from dicom_io.codes import (
    INDETERMINATE,
    INDETERMINATE_CONCEPT,
    REASON_CONCEPT,
    UNTYPED_FINDING_CONCEPTS,
    class_name_for,
    has_reason,
)
from dicom_io.sr.results import AlgorithmInfo, ClassificationReport
from dicom_io.sr.writer import CLASSES_PARAMETER, TASK_PARAMETER, SRError

__all__ = ["read_classification_sr", "describe"]

_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def read_classification_sr(ds: Dataset) -> ClassificationReport:
    """The finding, probabilities, algorithm and referenced instances of a classification SR.

    Class names come from the algorithm parameters the writer records; an SR without them is read with the
    codes' meanings as names. An indeterminate finding reads as ``"indeterminate"`` and an untyped finding as its
    label (``"tumor"``), each with its ``reason`` (the TEXT item after it). Raises :class:`SRError` when ``ds`` is
    not a TID 1500 report with one measurement group holding a finding.
    """
    if ds.get("SOPClassUID") != _COMPREHENSIVE_3D_SR:
        raise SRError(f"not a Comprehensive 3D SR (SOP Class UID {ds.get('SOPClassUID')!r})")
    try:
        report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
        groups = report.get_image_measurement_groups()
    except (AttributeError, ValueError, TypeError) as exc:
        raise SRError(f"not a TID 1500 measurement report: {exc}") from exc
    if len(groups) != 1:
        raise SRError(f"expected one measurement group, found {len(groups)}")
    group = groups[0]
    if group.finding_type is None:
        raise SRError("the measurement group has no Finding")

    texts: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT":
            texts.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(str(item.TextValue))
    parameters = [tuple(p.split("=", 1)) for p in texts.get(codes.DCM.AlgorithmParameters.value, []) if "=" in p]
    own = {key: value for key, value in parameters if key in (TASK_PARAMETER, CLASSES_PARAMETER)}
    class_names = own[CLASSES_PARAMETER].split(",") if CLASSES_PARAMETER in own else None

    def name_of(concept: hd.sr.CodedConcept) -> str:
        if class_names is None:
            return str(concept.meaning)
        try:
            return class_name_for(concept.value, concept.scheme_designator, class_names)
        except KeyError as exc:
            raise SRError(str(exc)) from None

    finding = _special_label(group.finding_type) or name_of(group.finding_type)
    reasons = texts.get(REASON_CONCEPT.value, []) if has_reason(finding) else []

    probabilities: dict[str, float] = {}
    for measurement in group.get_measurements():
        probabilities[name_of(measurement.name)] = float(measurement.value)
    if class_names is not None and set(probabilities) != set(class_names):
        raise SRError(f"probabilities for {sorted(probabilities)} but the SR names the classes {class_names}")

    devices = report.get_observer_contexts(observer_type=codes.cid270.Device)
    if not devices:
        raise SRError("the SR names no observer device (the model)")
    device = devices[0].observer_identifying_attributes
    try:
        algorithm = AlgorithmInfo(
            name=_first(texts, codes.DCM.AlgorithmName.value),
            version=_first(texts, codes.DCM.AlgorithmVersion.value),
            uid=str(device.uid),
            manufacturer=str(device.manufacturer_name or ""),
            parameters=tuple((k, v) for k, v in parameters if k not in own),
        )
    except ValueError as exc:
        raise SRError(f"incomplete algorithm identification: {exc}") from None
    return ClassificationReport(
        sop_instance_uid=str(ds.SOPInstanceUID),
        task=own.get(TASK_PARAMETER),
        finding=finding,
        probabilities=probabilities,
        algorithm=algorithm,
        referenced_instances=tuple(
            (str(s.referenced_sop_class_uid), str(s.referenced_sop_instance_uid)) for s in group.source_images
        ),
        predecessors=tuple(
            str(instance.ReferencedSOPInstanceUID)
            for study in ds.get("PredecessorDocumentsSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for instance in series.get("ReferencedSOPSequence", [])
        ),
        reason=reasons[0] if reasons else None,
    )


def describe(path: str | PathLike[str]) -> str:
    """A readable summary of the classification SR at ``path`` (for ``dicom-triage sr show``)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise SRError(f"{path}: cannot read a DICOM file: {exc}") from exc
    report = read_classification_sr(ds)
    lines = [
        f"SR {report.sop_instance_uid}"
        + (f" (replaces {', '.join(report.predecessors)})" if report.predecessors else ""),
        f"Patient: {ds.get('PatientName', '')} ({ds.get('PatientID', '')})   Study: {ds.get('StudyInstanceUID', '')}",
        f"Task: {report.task or 'unknown'}   Verification: {ds.get('VerificationFlag', '')}",
        f"Finding: {report.finding}",
        *([f"Reason: {report.reason}"] if report.reason else []),
        "Probabilities:",
        *(f"  {name:<12} {p:7.4f}" for name, p in sorted(report.probabilities.items(), key=lambda kv: -kv[1])),
        f"Model: {report.algorithm.name} {report.algorithm.version} (UID {report.algorithm.uid},"
        f" {report.algorithm.manufacturer})",
        *(f"  {key} = {value}" for key, value in report.algorithm.parameters),
        f"Referenced images: {len(report.referenced_instances)}",
        *(f"  {uid}" for _, uid in report.referenced_instances),
    ]
    return "\n".join(lines)


def _special_label(concept: hd.sr.CodedConcept) -> str | None:
    """``"indeterminate"`` or an untyped finding's label for their concepts, ``None`` for any other (a class')."""
    specials = {INDETERMINATE: INDETERMINATE_CONCEPT, **UNTYPED_FINDING_CONCEPTS}
    for label, code in specials.items():
        if (concept.value, concept.scheme_designator) == (code.value, code.scheme_designator):
            return label
    return None


def _first(texts: dict[str, list[str]], code_value: str) -> str:
    values = texts.get(code_value)
    return values[0] if values else ""
