"""What ``dicom-triage results`` shows: every series' state and current result, and the rejected instances."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from worker.db import Database, Job, JobState, RejectedInstance, Result, Series, Study
from worker.reporting import sr_summaries


def results_report(database: Database, study_instance_uid: str | None = None) -> dict[str, Any]:
    """The JSON document of issue 3: ``{"series": [...], "rejected": [...]}``.

    A series' ``status`` is its latest job's state, or ``received`` while instances wait for the quiet time; its
    label and probabilities are those of its current (not superseded) result, if any. ``rejected`` lists every
    refused instance (a refusal is not tied to a study, so ``study_instance_uid`` does not filter it). ``sr`` is
    the current result's latest SR and its delivery to each destination (:func:`worker.reporting.sr_summaries`).
    ``result_reason`` is why the current result is ``indeterminate`` (``None`` for a class label or no result);
    ``reason`` stays the job's own line (its state, or the summary of its result).
    """
    with database.session() as session:
        query = (
            select(Series, Study.study_instance_uid)
            .join(Study, Series.study_pk == Study.id)
            .order_by(Series.first_received_at, Series.id)
        )
        if study_instance_uid is not None:
            query = query.where(Study.study_instance_uid == study_instance_uid)
        rows = session.execute(query).all()
        series_pks = [series.id for series, _ in rows]
        jobs = {
            job.series_pk: job
            for job in session.scalars(select(Job).where(Job.series_pk.in_(series_pks)).order_by(Job.revision))
        }
        results = {
            result.series_pk: result
            for result in session.scalars(
                select(Result).where(Result.series_pk.in_(series_pks), Result.superseded_by_pk.is_(None))
            )
        }
        srs = sr_summaries(session, [result.id for result in results.values()])
        entries = []
        for series, study_uid in rows:
            job = jobs.get(series.id)
            result = results.get(series.id)
            waiting = series.pending or job is None
            entries.append(
                {
                    "study_instance_uid": study_uid,
                    "series_instance_uid": series.series_instance_uid,
                    "modality": series.modality,
                    "status": JobState.RECEIVED.value if waiting else job.state.value,
                    "task": job.task if job else None,
                    "label": result.label if result else None,
                    "probabilities": result.probabilities if result else None,
                    "model_uid": result.model_uid if result else None,
                    "result_reason": result.reason if result else None,
                    "reason": "waiting for the series to complete" if waiting else job.reason,
                    "sr": srs.get(result.id) if result else None,
                }
            )
        rejected = [
            {"calling_ae": r.calling_ae, "sop_instance_uid": r.sop_instance_uid or None, "reason": r.reason}
            for r in session.scalars(select(RejectedInstance).order_by(RejectedInstance.id))
        ]
    return {"series": entries, "rejected": rejected}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`results_report` for people."""
    lines = [f"{'series':<40} {'mod':<4} {'status':<15} {'task':<12} {'label':<12} reason"]
    for entry in report["series"]:
        label = entry["label"] or "-"
        probability = (entry["probabilities"] or {}).get(entry["label"])  # none for an indeterminate label
        if probability is not None:
            label = f"{label} {probability:.2f}"
        lines.append(
            f"{entry['series_instance_uid'][-40:]:<40} {entry['modality']:<4} {entry['status']:<15} "
            f"{entry['task'] or '-':<12} {label:<12} {entry['reason']}"
        )
    if report["rejected"]:
        lines.append("")
        lines.append("rejected:")
        lines.extend(
            f"  {r['calling_ae']:<16} {r['sop_instance_uid'] or '(association)'}: {r['reason']}"
            for r in report["rejected"]
        )
    return "\n".join(lines)
