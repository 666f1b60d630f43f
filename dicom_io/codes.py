"""Coded concepts for what the classifiers report: one definition, used by the SR writer, the reader and the tests.

``dicom_io`` does not import ``models``, so the tables are keyed by the class-name and task-name strings of
``models.tasks``; the worker's tests check that every class of every task has a concept here.

Class concepts (the value of the measurement group's "Finding", DCM 121071, and the name of each class' probability
measurement):

============  ===========  =========================  =====================================================
class         SNOMED CT    meaning                    checked against
============  ===========  =========================  =====================================================
glioma        393564001    Glioma                     three independent code tables (a FHIR oncology
                                                      mapping, a neoplasm morphology map, the MR-RATE
                                                      brain-MRI finding ontology); not 393563007, which
                                                      those sources and a FHIR example give as
                                                      Glioblastoma multiforme. Not seen in an official
                                                      SNOMED browser page: confirm before clinical use.
meningioma    302820008    Intracranial meningioma    SNOMED International release notes, October 2025
                                                      ("302820008 |Intracranial meningioma (disorder)|",
                                                      remodelled on 1373614004 |Meningioma (morphologic
                                                      abnormality)|). Intracranial, because the input is
                                                      brain MRI.
pituitary     254956000    Pituitary adenoma          Human Phenotype Ontology HP:0002893 "Pituitary
                                                      adenoma" (xref SNOMEDCT_US:254956000); the dataset's
                                                      "pituitary" class is pituitary tumours, nearly all
                                                      adenomas.
COVID         840539006    COVID-19                   the EU Digital COVID Certificate value set
                                                      "disease-agent-targeted" (840539006 = COVID-19) and
                                                      FHIR implementation guides' COVID-19 value sets.
                                                      Fully specified name: Disease caused by severe acute
                                                      respiratory syndrome coronavirus 2 (disorder).
notumor       260415000    Not detected               the EU Digital COVID Certificate value set
non-COVID     260415000    Not detected               "covid-19-lab-result" (260415000 Not detected,
                                                      260373001 Detected); FHIR laboratory examples.
============  ===========  =========================  =====================================================

How the negative classes are encoded: SNOMED CT has no pre-coordinated "no brain tumour" or "COVID-19 not
detected" finding in the international edition, and "No abnormality detected" (281900007) would claim more than a
tumour classifier can. So a negative result is the qualifier "Not detected" (260415000), the way laboratories report
a negative test; what was not detected is given by the measurement group around it (its tracking identifier names
the task, and the procedure reported is brain MRI or CT chest) and by the probabilities of the positive classes
beside it. Within one task each concept belongs to one class, so :func:`class_name_for` maps codes back.

An indeterminate result (the label ``"indeterminate"``, ``models.tasks.INDETERMINATE``: the model could not judge
the series, e.g. no lung in the field or not a brain) is no class of any task, so it is not in
:data:`CLASS_CONCEPTS`; :func:`finding_concept` gives its concept:

=============  ===========  ============  =============================================================
label          code         meaning       checked against
=============  ===========  ============  =============================================================
indeterminate  373068000    Undetermined  PS3.16 as packaged in pydicom's ``codedict`` (CID 230 "Yes-No"
               (SNOMED CT)                and CID 240 "Present-Absent", the standard's third answer
                                          beside present and absent). Not 82334004 "Indeterminate",
                                          which PS3.16 only lists for visual fixation quality (CID
                                          4220), nor DCM 114011 "Value indeterminate", a numeric value
                                          qualifier (CID 42/44).
=============  ===========  ============  =============================================================

An untyped finding (the label ``"tumor"``, ``models.tasks.BRAIN_TUMOR.untyped_finding``: a tumour is suspected on a
sequence whose tumour types the model was not taught, e.g. FLAIR) is no class either; :data:`UNTYPED_FINDING_CONCEPTS`
gives its concept, and its reason (why the type is not given) goes beside it as for an indeterminate result:

=============  ===========  =================  ========================================================
label          SNOMED CT    meaning            checked against
=============  ===========  =================  ========================================================
tumor          126952004    Neoplasm of brain  Synthea's and several oncology code maps ("Neoplasm of brain
                                               (disorder)", ICD-10 C71.9's SNOMED counterpart). It does not
                                               name the type, which is the point; strictly a meningioma or
                                               a pituitary adenoma lies outside the brain. Not seen in an
                                               official SNOMED browser page: confirm before clinical use.
=============  ===========  =================  ========================================================

Why it is indeterminate goes beside the finding as a TEXT item named DCM 121106 "Comment" (:data:`REASON_CONCEPT`;
PS3.16 has no "reason for indeterminate result" concept, and "Comment" is the generic free-text observation). The
reason is plain text made by the worker (what was out of domain), never patient data.

Procedures reported (TID 1500), from DICOM PS3.16 as packaged in pydicom's ``codedict``: brain MRI is LOINC
24590-2 "Brain MRI" (CID 646); CT chest is LOINC 24627-2 (CID 7000 lists it as "CT Chest Report"; LOINC's own
name is "CT Chest"). Finding sites: SNOMED CT 12738006 "Brain" and 39607008 "Lung" (PS3.16 CID 4 "Anatomic
Region", via pydicom).
Probabilities are dimensionless: UCUM ``{probability}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from pydicom.sr.coding import Code

__all__ = [
    "INDETERMINATE",
    "INDETERMINATE_CONCEPT",
    "UNTYPED_FINDING_CONCEPTS",
    "has_reason",
    "REASON_CONCEPT",
    "NOT_DETECTED",
    "PROBABILITY_UNIT",
    "CLASS_CONCEPTS",
    "PROCEDURE_CONCEPTS",
    "FINDING_SITE_CONCEPTS",
    "class_concept",
    "class_name_for",
    "finding_concept",
    "procedure_concept",
    "finding_site_concept",
]

#: A negative result (see the module docstring).
NOT_DETECTED = Code("260415000", "SCT", "Not detected")

#: The label of a result the model could not judge; the same string as ``models.tasks.INDETERMINATE`` (``dicom_io``
#: does not import ``models``; the worker's tests check that they agree).
INDETERMINATE = "indeterminate"

#: The finding of an indeterminate result (see the module docstring).
INDETERMINATE_CONCEPT = Code("373068000", "SCT", "Undetermined")

#: The concept name of the TEXT item that says why a result is indeterminate.
REASON_CONCEPT = Code("121106", "DCM", "Comment")

#: Unit of the per-class probability measurements.
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")

CLASS_CONCEPTS: Mapping[str, Code] = MappingProxyType(
    {
        "glioma": Code("393564001", "SCT", "Glioma"),
        "meningioma": Code("302820008", "SCT", "Intracranial meningioma"),
        "pituitary": Code("254956000", "SCT", "Pituitary adenoma"),
        "notumor": NOT_DETECTED,
        "COVID": Code("840539006", "SCT", "COVID-19"),
        "non-COVID": NOT_DETECTED,
    }
)

#: The concepts of the untyped findings (see the module docstring), by label; the worker's tests check that every
#: task's ``untyped_finding`` has one.
UNTYPED_FINDING_CONCEPTS: Mapping[str, Code] = MappingProxyType(
    {
        "tumor": Code("126952004", "SCT", "Neoplasm of brain"),
    }
)

PROCEDURE_CONCEPTS: Mapping[str, Code] = MappingProxyType(
    {
        "brain-tumor": Code("24590-2", "LN", "Brain MRI"),
        "covid-ct": Code("24627-2", "LN", "CT Chest"),
    }
)

FINDING_SITE_CONCEPTS: Mapping[str, Code] = MappingProxyType(
    {
        "brain-tumor": Code("12738006", "SCT", "Brain"),
        "covid-ct": Code("39607008", "SCT", "Lung"),
    }
)


def _lookup(table: Mapping[str, Code], key: str, what: str) -> Code:
    try:
        return table[key]
    except KeyError:
        raise KeyError(f"no coded concept for {what} {key!r}; known: {', '.join(table)}") from None


def class_concept(class_name: str) -> Code:
    """The coded concept for a class name of ``models.tasks``; ``KeyError`` names the known classes."""
    return _lookup(CLASS_CONCEPTS, class_name, "class")


def procedure_concept(task_name: str) -> Code:
    """The imaging procedure a task's SR reports on (TID 1500 "Procedure reported")."""
    return _lookup(PROCEDURE_CONCEPTS, task_name, "task")


def finding_site_concept(task_name: str) -> Code:
    """The anatomy a task's finding is about."""
    return _lookup(FINDING_SITE_CONCEPTS, task_name, "task")


def class_name_for(value: str, scheme_designator: str, class_names: Iterable[str]) -> str:
    """Map a coded value back to the one class among ``class_names`` that it encodes.

    Raises ``KeyError`` when no class (or more than one) of ``class_names`` has that code.
    """
    names = list(class_names)
    matches = [
        name
        for name in names
        if CLASS_CONCEPTS.get(name) is not None
        and CLASS_CONCEPTS[name].value == value
        and CLASS_CONCEPTS[name].scheme_designator == scheme_designator
    ]
    if len(matches) != 1:
        raise KeyError(f"code ({value}, {scheme_designator}) matches {len(matches)} of the classes {names}")
    return matches[0]


def finding_concept(label: str) -> Code:
    """The concept of a result's finding: its class' (:func:`class_concept`), :data:`INDETERMINATE_CONCEPT`, or an
    untyped finding's (:data:`UNTYPED_FINDING_CONCEPTS`)."""
    if label == INDETERMINATE:
        return INDETERMINATE_CONCEPT
    if label in UNTYPED_FINDING_CONCEPTS:
        return UNTYPED_FINDING_CONCEPTS[label]
    return class_concept(label)


def has_reason(label: str) -> bool:
    """Whether a result with this label carries a reason: an indeterminate one (why not judged) or an untyped
    finding (why no type)."""
    return label == INDETERMINATE or label in UNTYPED_FINDING_CONCEPTS

