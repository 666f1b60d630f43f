"""Live before backfill (issue 19): with a backfill's series queued, a live series pushed by dcmtk's storescu is
classified ahead of most of them, in about the time a lone live series takes; without the separate queue it would
wait for every one of them. Both latencies are printed.

The backfilled study is marked as the backfill runner marks it (a plan naming its study); its series then arrive
by storescu like any C-MOVE sub-operation would. One series per task (``inference_group_frames`` 2), so "one batch"
is one backfill series.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from dicom_factory import brain_images
from dicom_io.synthesis import mr_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment, wait_for
from test_e2e_pipeline import push
from worker.db import Database, Job, JobState, Series, upgrade_database
from worker.db.backfill import BackfillPlan, BackfillStudy, PlanState, StudyState

BACKFILL_SERIES = 200
BACKFILL_STUDY = "1.2.826.0.1.3680043.8.498.19190001"
STARTUP_SECONDS = 180
#: The scheduler's poll (half the 1 s quiet time) and the filesystem broker's 0.1 s poll, with margin.
SLACK_SECONDS = 1.0


def _finished(database: Database, series_uid: str) -> tuple[datetime, datetime] | None:
    """(last instance received, job finished) of a series classified, or None."""
    with database.session() as session:
        row = session.execute(select(Series.last_received_at, Job.finished_at).join(Job, Job.series_pk == Series.id)
                              .where(Series.series_instance_uid == series_uid, Job.state == JobState.DONE)).first()
    return (row[0], row[1]) if row is not None else None


def test_a_live_series_is_classified_ahead_of_a_queued_backfill(models_dir: Path, tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    data_dir.mkdir()
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    upgrade_database(database)
    with database.session() as session:
        plan = BackfillPlan(source="PACS@127.0.0.1:4242", query="test", state=PlanState.DONE.value)
        session.add(plan)
        session.flush()
        session.add(BackfillStudy(plan_pk=plan.id, study_instance_uid=BACKFILL_STUDY,
                                  state=StudyState.RECEIVED.value))
    env = triage_environment(models_dir, inference_group_frames=2)
    serve = Child(triage_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(port),
                                 "--web-port", str(free_port())), env, name="serve")
    try:
        serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")

        # A lone live series: the baseline.
        lone = mr_series(brain_images(2, seed=81))
        push(port, lone, tmp_path / "lone")
        received, done = wait_for(lambda: _finished(database, lone[0].SeriesInstanceUID), 120, "the lone series",
                                  serve, alive=True)
        lone_seconds = (done - received).total_seconds()

        backfill = [mr_series(brain_images(2, seed=100 + i), study_instance_uid=BACKFILL_STUDY, series_number=i + 1)
                    for i in range(BACKFILL_SERIES)]
        push(port, [ds for series in backfill for ds in series], tmp_path / "backfill")

        def backfill_queued() -> bool:
            with database.session() as session:
                return len(session.scalars(select(Job.id).join(Series, Job.series_pk == Series.id).where(
                    Series.series_instance_uid.in_([s[0].SeriesInstanceUID for s in backfill]))).all()) \
                    == BACKFILL_SERIES

        wait_for(backfill_queued, 120, "the backfill's jobs", serve, alive=True)
        live = mr_series(brain_images(2, seed=82))
        push(port, live, tmp_path / "live")
        received, done = wait_for(lambda: _finished(database, live[0].SeriesInstanceUID), 180, "the live series",
                                  serve, alive=True)
        live_seconds = (done - received).total_seconds()
        with database.session() as session:
            backfill_jobs = select(Job).join(Series, Job.series_pk == Series.id).where(
                Series.series_instance_uid.in_([s[0].SeriesInstanceUID for s in backfill]))
            backfill_done_before = sum(1 for job in session.scalars(backfill_jobs)
                                       if job.finished_at is not None and job.finished_at < done)
            # One batch: the longest a backfill task took (one series each here).
            batch_seconds = max((job.finished_at - job.started_at).total_seconds()
                                for job in session.scalars(backfill_jobs)
                                if job.finished_at is not None and job.started_at is not None)
        print(f"\nlone live series: {lone_seconds:.2f} s; live series behind a {BACKFILL_SERIES}-series backfill: "
              f"{live_seconds:.2f} s ({backfill_done_before} backfill series classified before it; one batch "
              f"{batch_seconds:.2f} s)")
        # It overtook the backfill (one FIFO queue would have put every backfill series ahead of it) ...
        assert backfill_done_before < BACKFILL_SERIES - 1, backfill_done_before
        # ... and took the lone series' time plus one batch; SLACK for the quiet-time and broker polls.
        assert live_seconds <= lone_seconds + batch_seconds + SLACK_SECONDS, (live_seconds, lone_seconds)
        assert serve.terminate() == 0
    finally:
        serve.stop()
        database.dispose()
