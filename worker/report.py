"""What ``dicom-triage results`` shows: every series' state and current result, and the rejected instances.

The report is read as a stream (issue 22): the series in chunks of :data:`CHUNK` rows through a server-side
cursor on one read-only snapshot, each chunk's SRs in one query, and the JSON or text written as it comes, so
memory stays bounded whatever the archive holds (``bench/worklist.py`` measures the peak over a million series).
:func:`results_report` builds the same document in memory for callers that want it whole (tests, small archives).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import aliased

from worker.db import Database, Job, JobState, RejectedInstance, Result, Series, Study
from worker.reporting import sr_summaries

#: Rows fetched and described at a time.
CHUNK = 1000


def iter_series(database: Database, study_instance_uid: str | None = None) -> Iterator[dict[str, Any]]:
    """Each series' entry of :func:`results_report`, in order of first arrival, read in chunks."""
    newer = aliased(Result)
    query = (
        select(
            Series.series_instance_uid, Series.modality, Series.pending, Study.study_instance_uid,
            Job.state, Job.task, Job.reason,
            Result.id, Result.label, Result.probabilities, Result.model_uid, Result.reason,
        )
        .join(Study, Series.study_pk == Study.id)
        # The latest job is the series' revision; the current result the newest not superseded.
        .outerjoin(Job, and_(Job.series_pk == Series.id, Job.revision == Series.revision))
        .outerjoin(Result, and_(
            Result.series_pk == Series.id, Result.superseded_by_pk.is_(None),
            ~exists().where(newer.series_pk == Series.id, newer.superseded_by_pk.is_(None), newer.id > Result.id),
        ))
        .order_by(Series.first_received_at, Series.id)
        .execution_options(yield_per=CHUNK)
    )
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    with database.read_session() as session:
        for chunk in session.execute(query).partitions():
            srs = sr_summaries(session, [row.id for row in chunk if row.id is not None])
            for (series_uid, modality, pending, study_uid, state, task, job_reason,
                 result_pk, label, probabilities, model_uid, result_reason) in chunk:
                waiting = pending or state is None
                yield {
                    "study_instance_uid": study_uid,
                    "series_instance_uid": series_uid,
                    "modality": modality,
                    "status": JobState.RECEIVED.value if waiting else JobState(state).value,
                    "task": task,
                    "label": label,
                    "probabilities": probabilities,
                    "model_uid": model_uid,
                    "result_reason": result_reason,
                    "reason": "waiting for the series to complete" if waiting else job_reason,
                    "sr": srs.get(result_pk) if result_pk is not None else None,
                }


def iter_rejected(database: Database) -> Iterator[dict[str, Any]]:
    """Every refused instance (a refusal is not tied to a study), oldest first, read in chunks."""
    query = (select(RejectedInstance.calling_ae, RejectedInstance.sop_instance_uid, RejectedInstance.reason)
             .order_by(RejectedInstance.id).execution_options(yield_per=CHUNK))
    with database.read_session() as session:
        for calling_ae, sop_instance_uid, reason in session.execute(query):
            yield {"calling_ae": calling_ae, "sop_instance_uid": sop_instance_uid or None, "reason": reason}


def results_report(database: Database, study_instance_uid: str | None = None) -> dict[str, Any]:
    """The JSON document of issue 3: ``{"series": [...], "rejected": [...]}``, whole in memory.

    A series' ``status`` is its latest job's state, or ``received`` while instances wait for the quiet time; its
    label and probabilities are those of its current (not superseded) result, if any. ``rejected`` lists every
    refused instance (a refusal is not tied to a study, so ``study_instance_uid`` does not filter it). ``sr`` is
    the current result's latest SR and its delivery to each destination (:func:`worker.reporting.sr_summaries`).
    ``result_reason`` is why the current result is ``indeterminate`` or why a finding has no type (``tumor``)
    (``None`` for a class label or no result);
    ``reason`` stays the job's own line (its state, or the summary of its result).
    """
    return {"series": list(iter_series(database, study_instance_uid)), "rejected": list(iter_rejected(database))}


def _write_list(out: TextIO, items: Iterable[dict[str, Any]]) -> None:
    # As json.dumps(..., indent=2) lays out a list that is the value of a top-level key, one item at a time.
    first = True
    for item in items:
        out.write("[\n    " if first else ",\n    ")
        out.write(json.dumps(item, indent=2).replace("\n", "\n    "))
        first = False
    out.write("[]" if first else "\n  ]")


def write_json(database: Database, out: TextIO, study_instance_uid: str | None = None) -> None:
    """:func:`results_report` as ``json.dumps(report, indent=2)`` writes it, streamed."""
    out.write('{\n  "series": ')
    _write_list(out, iter_series(database, study_instance_uid))
    out.write(',\n  "rejected": ')
    _write_list(out, iter_rejected(database))
    out.write("\n}\n")


def format_lines(series: Iterable[dict[str, Any]], rejected: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The lines of the plain-text table for people."""
    yield f"{'series':<40} {'mod':<4} {'status':<15} {'task':<12} {'label':<12} reason"
    for entry in series:
        label = entry["label"] or "-"
        probability = (entry["probabilities"] or {}).get(entry["label"])  # none for an indeterminate label
        if probability is not None:
            label = f"{label} {probability:.2f}"
        yield (
            f"{entry['series_instance_uid'][-40:]:<40} {entry['modality']:<4} {entry['status']:<15} "
            f"{entry['task'] or '-':<12} {label:<12} {entry['reason']}"
        )
    first = True
    for r in rejected:
        if first:
            yield ""
            yield "rejected:"
            first = False
        yield f"  {r['calling_ae']:<16} {r['sop_instance_uid'] or '(association)'}: {r['reason']}"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`results_report` for people."""
    return "\n".join(format_lines(report["series"], report["rejected"]))


def write_text(database: Database, out: TextIO, study_instance_uid: str | None = None) -> None:
    """:func:`format_report` of the whole report, streamed."""
    for line in format_lines(iter_series(database, study_instance_uid), iter_rejected(database)):
        out.write(line + "\n")
