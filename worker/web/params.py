"""The web app's request parameters, declared once and shared by the pages and the JSON API.

Every route takes its ids, pages and filters through these annotated types, so a bad value gets the same answer
on both: FastAPI refuses it with a 422 before the route runs (the pages show it as an error page, the API as JSON).
The bounds come from what the database can hold, so no value that passes validation can make a query fail:

* Ids are ``Integer`` columns. PostgreSQL's ``integer`` is 32-bit signed, and SQLAlchemy's psycopg dialect casts
  every bound id to it, so an id above 2**31 - 1 is a ``DataError`` there (SQLite's 64 bits would hold it; the
  narrower engine decides). Ids start at 1.
* Worklist pages are keyset pages: ``cursor`` (:class:`worker.web.worklist.Cursor`) is checked by its pattern,
  and every string the pattern admits decodes, so a schema-valid cursor is never refused.
* Filters accept their listed values, or the empty string a form's "any" option sends (the same as leaving it out).
* Free text that is stored (comments, reasons, names) holds no NUL character: PostgreSQL's text cannot. JSON
  bodies say so with :data:`NO_NUL`; every form field is checked by :func:`worker.web.auth.checked_form`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from fastapi import Path, Query

from worker.db.registry import ModelState
from worker.web.worklist import CURSOR_PATTERN, FILTER_CHOICES, PAGE_SIZE, Cursor

#: The largest id an ``Integer`` column holds on every supported database (PostgreSQL ``integer``).
DB_ID_MAX = 2**31 - 1
MAX_PAGE_SIZE = 500
#: DICOM's Number of Frames is an IS: at most 2**31 - 1.
MAX_FRAME = 2**31 - 1


#: The pattern of stored free text: anything but NUL.
NO_NUL = r"^[^\x00]*$"


def row_id(what: str) -> Any:
    """A path parameter naming one row by its id."""
    return Path(ge=1, le=DB_ID_MAX, description=f"the {what}'s id (1..{DB_ID_MAX})")


StudyId = Annotated[int, row_id("study")]
ResultId = Annotated[int, row_id("result")]
InstanceId = Annotated[int, row_id("instance")]
UserId = Annotated[int, row_id("user")]
RunId = Annotated[int, row_id("training run")]
PlanId = Annotated[int, row_id("backfill plan")]
#: A model's UID: a DICOM UID, as the registry's column holds it (digits and dots, at most 64 characters).
ModelUid = Annotated[str, Path(pattern=r"^[0-9][0-9.]{0,63}$", description="the model's UID")]
Frame = Annotated[int, Path(ge=1, le=MAX_FRAME, description="the frame, from 1")]
AxialSlice = Annotated[int, Path(ge=1, le=MAX_FRAME, description="the axial slice cut from the volume, from 1")]

PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"rows a page, 1..{MAX_PAGE_SIZE}")]
AuditBefore = Annotated[
    int | None, Query(ge=1, le=DB_ID_MAX, description="show the events older than this event id")
]


def _cursor(value: str | None) -> Cursor | None:
    return None if value is None else Cursor.decode(value)


#: A worklist page's cursor (a page's ``next`` or ``previous``); every value its pattern admits decodes. A string
#: in the URL and the schema, it reaches the route decoded: a :class:`Cursor` (or ``None``).
PageCursor = Annotated[
    str | None,
    Query(pattern=CURSOR_PATTERN, description="the page this cursor leads to (a page's next or previous); "
                                              "none: the first page"),
    AfterValidator(_cursor),
]


def _choice(values: tuple[str, ...]) -> Any:
    # A Literal built from the one list of allowed values (worklist.FILTER_CHOICES), so the schema enumerates them
    # and validation cannot drift from the query's own check. "" is the forms' "any".
    return Literal[("", *values)]  # type: ignore[valid-type]


StatusFilter = Annotated[_choice(FILTER_CHOICES["status"]) | None, Query(description="the study's status")]
TaskFilter = Annotated[_choice(FILTER_CHOICES["task"]) | None, Query(description="a task its series were routed to")]
FindingFilter = Annotated[
    _choice(FILTER_CHOICES["finding"]) | None, Query(description="a current result's label (a class or indeterminate)")
]
ReviewFilter = Annotated[_choice(FILTER_CHOICES["review"]) | None, Query(description="the study's review state")]
ModelTaskFilter = Annotated[_choice(FILTER_CHOICES["task"]) | None, Query(description="only this task's models")]
ModelStateFilter = Annotated[
    _choice(tuple(s.value for s in ModelState)) | None, Query(description="only models in this state")
]

__all__ = [
    "DB_ID_MAX", "MAX_FRAME", "MAX_PAGE_SIZE", "NO_NUL", "PAGE_SIZE", "AuditBefore", "PageCursor",
    "FindingFilter", "Frame", "InstanceId", "ModelStateFilter", "ModelUid", "ModelTaskFilter", "PageSize", "PlanId",
    "ResultId", "ReviewFilter", "RunId", "StatusFilter", "StudyId", "TaskFilter", "UserId",
]
