"""dicom_io.codes: every class and task of models.tasks has its coded concepts, and codes map back to classes."""

from __future__ import annotations

import pytest

from dicom_io import codes
from dicom_io.codes import (
    CLASS_CONCEPTS,
    INDETERMINATE_CONCEPT,
    NOT_DETECTED,
    class_concept,
    class_name_for,
    finding_concept,
    finding_site_concept,
    procedure_concept,
)
from models import tasks
from models.tasks import TASKS


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_every_class_of_every_task_has_a_distinct_concept(task) -> None:
    concepts = [class_concept(name) for name in task.class_names]
    assert len({(c.value, c.scheme_designator) for c in concepts}) == task.num_classes
    for name in task.class_names:
        concept = class_concept(name)
        assert class_name_for(concept.value, concept.scheme_designator, task.class_names) == name
        assert (concept == NOT_DETECTED) == (name in task.negative_classes)
        assert len(concept.meaning) <= 64
    assert procedure_concept(task.name).scheme_designator == "LN"
    assert finding_site_concept(task.name).scheme_designator == "SCT"


def test_table_has_no_class_that_no_task_uses() -> None:
    used = {name for task in TASKS.values() for name in task.class_names}
    assert set(CLASS_CONCEPTS) == used


def test_unknown_names_and_ambiguous_codes_raise() -> None:
    with pytest.raises(KeyError, match="known"):
        class_concept("astrocytoma")
    with pytest.raises(KeyError, match="known"):
        procedure_concept("knee-xray")
    # "Not detected" is the negative of both tasks: without the task's classes it is ambiguous.
    with pytest.raises(KeyError, match="matches 2"):
        class_name_for(NOT_DETECTED.value, NOT_DETECTED.scheme_designator, CLASS_CONCEPTS)


def test_indeterminate_has_its_own_concept_and_is_no_class() -> None:
    assert codes.INDETERMINATE == tasks.INDETERMINATE  # dicom_io cannot import models: the two must agree
    assert finding_concept(tasks.INDETERMINATE) == INDETERMINATE_CONCEPT
    assert (INDETERMINATE_CONCEPT.value, INDETERMINATE_CONCEPT.scheme_designator) == ("373068000", "SCT")
    assert finding_concept("glioma") == class_concept("glioma")
    all_classes = [name for task in TASKS.values() for name in task.class_names]
    assert all(class_concept(name) != INDETERMINATE_CONCEPT for name in all_classes)
    with pytest.raises(KeyError):
        class_name_for(INDETERMINATE_CONCEPT.value, INDETERMINATE_CONCEPT.scheme_designator, all_classes)
    with pytest.raises(KeyError, match="known"):
        finding_concept("undetermined")
