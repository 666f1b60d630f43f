"""Backfill runners against a misbehaving PACS (issue 19): a real pynetdicom Q/R SCP (tests/fake_pacs.py) on a
loopback port, the runner in this process on a real database.

- Two runners on one database (SQLite, then PostgreSQL) retrieve every study once: each claims a study atomically.
- Retrieval waits while live ingest is busy (live series waiting, live instances arriving), records the pause in
  the status, and resumes once live ingest is quiet; a pause longer than its bound lets one study start.
- The issue's bad input: a C-MOVE destination the PACS does not know, a PACS gone silent or "pending" forever
  mid-retrieval, thousands of C-FIND matches, a C-GET answered with instances of a study not asked for: each a
  clear reason, and nothing already stored lost.

Runners are driven one round at a time (``run_once``) where order matters, or as threads whose progress is waited
on with a bound: no sleep then assert.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from dicom_factory import brain_images
from dicom_io.retrieve import QueryError
from dicom_io.synthesis import mr_series
from fake_pacs import FakePacs, fake_pacs
from processes import triage_command, triage_environment, wait_for
from test_web_helpers import make_database, make_settings, seed_study
from worker.backfill import BackfillRunner, claim_planned_study, make_plan, plan_status, start_plan, take_over_study
from worker.db import Database, Instance, Job, JobState, RejectedInstance, Series, utcnow
from worker.db.backfill import BackfillPlan, BackfillSeries, BackfillStudy

ANY_DATE = "19000101-20991231"


def _serve_studies(pacs: FakePacs, count: int, seed: int) -> None:
    for index in range(count):
        pacs.add_series(mr_series(brain_images(1, seed=seed + index), patient_id=f"RUN-{seed + index}",
                                  accession_number=f"R{seed + index}"))


def _status(database: Database, plan_id: int = 1) -> dict[str, Any]:
    (plan,) = plan_status(database, plan_id)
    return plan


def _planned(database: Database, settings: Any, pacs: FakePacs, studies: int) -> int:
    summary = make_plan(database, settings, pacs.source, "MR", ANY_DATE)
    assert summary.studies == studies
    start_plan(database, summary.plan_id, max_in_flight=1000, per_minute=1e6)
    return summary.plan_id


def test_two_runners_never_retrieve_a_study_twice(database_url: str, database: Database, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url=database_url, backfill_retrieve="get", min_free_disk_mb=0)
    with fake_pacs() as pacs:
        _serve_studies(pacs, 16, seed=300)
        plan_id = _planned(database, settings, pacs, 16)
        # Each runner on its own engine, as two `serve` hosts would be.
        engines = [Database(database_url) for _ in range(2)]
        runners = [BackfillRunner(settings, engine, poll_seconds=0.01, name=f"host-{i}:runner")
                   for i, engine in enumerate(engines)]
        stop = threading.Event()
        threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in runners]
        try:
            for thread in threads:
                thread.start()
            wait_for(lambda: _status(database, plan_id)["studies"]["received"] == 16, 60, "every study received")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            for engine in engines:
                engine.dispose()
        retrieved = pacs.retrievals()
    assert sorted(retrieved) == sorted(pacs.series), "a series retrieved twice, or one not at all"
    with database.session() as session:
        assert set(session.scalars(select(BackfillSeries.moves))) == {1}
        claimed_by = set(session.scalars(select(BackfillStudy.runner)))
        assert claimed_by <= {"host-0:runner", "host-1:runner"}
        assert session.scalar(select(func.count(Instance.id))) == 16
    assert _status(database, plan_id)["failures"] == []


def test_retrieval_waits_while_live_ingest_is_busy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backfill_retrieve="get", min_free_disk_mb=0, backfill_pause_live_series=0,
                             backfill_pause_live_instances=0, backfill_pause_window_seconds=3600)
    database = make_database(settings)
    # A live series waiting for classification.
    seed_study(database, settings, cls="glioma", label="glioma", slices=1, state=JobState.QUEUED)
    stop = threading.Event()
    with fake_pacs() as pacs:
        _serve_studies(pacs, 1, seed=400)
        plan_id = _planned(database, settings, pacs, 1)
        runner = threading.Thread(target=BackfillRunner(settings, database, poll_seconds=0.01).run, args=(stop,),
                                  daemon=True)
        runner.start()
        try:
            paused = wait_for(lambda: _status(database, plan_id)["paused"], 30, "the plan paused")
            assert paused["reason"].startswith("1 live series waiting for or in classification"), paused
            # The pause is recorded where the study would have been claimed: nothing was asked of the PACS.
            assert pacs.requests == [] and _status(database, plan_id)["studies"]["planned"] == 1

            # The live series is classified, but it is still receiving instances (pending, received just now).
            with database.session() as session:
                session.execute(update(Job).values(state=JobState.DONE))
                session.execute(update(Series).values(pending=True, last_received_at=func.now()))
                session.execute(update(Instance).values(received_at=func.now()))
            wait_for(lambda: "live instances received" in (_status(database, plan_id)["paused"] or {}).get(
                "reason", ""), 30, "the pause's reason: live instances")
            assert pacs.requests == []

            with database.session() as session:  # live ingest quiet: the series is complete and classified
                session.execute(update(Series).values(pending=False))
            assert pacs.retrieved.wait(30), "the backfill did not resume"
            plan = wait_for(lambda: (p := _status(database, plan_id))["studies"]["received"] == 1 and p, 30,
                            "the study received")
        finally:
            stop.set()
            runner.join(timeout=30)
    assert plan["paused"] is None and plan["paused_seconds"] > 0, plan
    database.dispose()


def test_a_pause_longer_than_its_bound_lets_one_study_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backfill_retrieve="get", min_free_disk_mb=0, backfill_max_pause_seconds=0.05)
    database = make_database(settings)
    seed_study(database, settings, cls="glioma", label="glioma", slices=1, state=JobState.QUEUED)
    with fake_pacs() as pacs:
        _serve_studies(pacs, 2, seed=410)
        plan_id = _planned(database, settings, pacs, 2)
        runner = BackfillRunner(settings, database)
        runner.run_once(threading.Event())
        assert _status(database, plan_id)["paused"] is not None and pacs.requests == []
        wait_for(lambda: _status(database, plan_id)["paused_seconds"] >= 0.05, 10, "the pause's bound")
        runner.run_once(threading.Event())  # paused past the bound: one study starts though live work waits
        assert len(pacs.requests) == 1
        runner.run_once(threading.Event())  # and the next round pauses again
        assert len(pacs.requests) == 1 and _status(database, plan_id)["paused"] is not None
    database.dispose()


@pytest.mark.parametrize(("retrieve", "behaviour", "reason"), [
    ("move", "unknown-destination", "C-MOVE of series {uid}: status 0xA801"),
    ("move", "silent", "C-MOVE of series {uid}: FAKEPACS@127.0.0.1:{port}: no final answer to C-MOVE within 1 s"),
    ("move", "pending-forever", "C-MOVE of series {uid}: FAKEPACS@127.0.0.1:{port}: C-MOVE still pending after 1 s"),
    ("get", "silent", "C-GET of series {uid}: FAKEPACS@127.0.0.1:{port}: no final answer to C-GET within 1 s"),
    ("get", "pending-forever", "C-GET of series {uid}: FAKEPACS@127.0.0.1:{port}: C-GET still pending after 1 s"),
])
def test_a_retrieval_the_pacs_does_not_finish_fails_its_study_with_the_reason(
    tmp_path: Path, retrieve: str, behaviour: str, reason: str
) -> None:
    settings = make_settings(tmp_path, backfill_retrieve=retrieve, min_free_disk_mb=0,
                             backfill_retrieve_timeout_seconds=1)
    database = make_database(settings)
    with fake_pacs() as pacs:
        _serve_studies(pacs, 2, seed=420)
        plan_id = _planned(database, settings, pacs, 2)
        pacs.retrieve = behaviour
        runner = BackfillRunner(settings, database)
        runner.run_once(threading.Event())
        plan = _status(database, plan_id)
        assert plan["studies"]["failed"] == 1 and plan["studies"]["planned"] == 1, plan
        (uid,) = pacs.retrievals()
        (failure,) = plan["failures"]
        assert failure["reason"].startswith(reason.format(uid=uid, port=pacs.port)), failure
        # The next study is retrieved as usual once the PACS behaves.
        pacs.retrieve = "serve"
        runner.run_once(threading.Event())
        if retrieve == "get":
            assert _status(database, plan_id)["studies"]["received"] == 1
    database.dispose()


def test_thousands_of_matches_end_the_query_with_a_reason(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backfill_max_matches=200)
    database = make_database(settings)
    with fake_pacs() as pacs:
        pacs.study_matches = 100_000
        with pytest.raises(QueryError, match=r"more than 200 matches; narrow the query"):
            make_plan(database, settings, pacs.source, "MR", ANY_DATE)
        assert pacs.aborted.wait(10), "the association was not aborted"
        # The abort ended the answer: the PACS never sent most of it. Socket buffers take a few thousand
        # responses before the abort lands, so the bound sits far above those and far below all of them.
        assert pacs.finds_answered < 20_000
    with database.session() as session:
        assert session.scalar(select(func.count(BackfillPlan.id))) == 0
    database.dispose()


def test_a_plan_of_many_studies_queries_their_series_on_one_association(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    database = make_database(settings)
    with fake_pacs() as pacs:
        pacs.study_matches = 300
        summary = make_plan(database, settings, pacs.source, "MR", ANY_DATE)
        associations = pacs.associations
    assert summary.studies == 300
    assert associations == 2  # the study-level C-FIND, then all 300 series-level ones
    database.dispose()


def test_a_c_get_answered_with_instances_not_asked_for_keeps_the_asked_ones(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backfill_retrieve="get", min_free_disk_mb=0)
    database = make_database(settings)
    with fake_pacs() as pacs:
        _serve_studies(pacs, 1, seed=430)
        stray = mr_series(brain_images(2, seed=431), patient_id="STRAY", accession_number="STRAY")
        pacs.strays = stray
        plan_id = _planned(database, settings, pacs, 1)
        BackfillRunner(settings, database).run_once(threading.Event())
        (asked,) = pacs.series
    plan = _status(database, plan_id)
    assert plan["studies"]["received"] == 1 and plan["failures"] == [], plan
    with database.session() as session:
        stored = set(session.scalars(select(Series.series_instance_uid)
                                     .join(Instance, Instance.series_pk == Series.id)))
        rejected = session.execute(select(RejectedInstance.sop_instance_uid, RejectedInstance.reason)).all()
    assert stored == {asked}
    assert sorted(uid for uid, _ in rejected) == sorted(str(ds.SOPInstanceUID) for ds in stray)
    assert all(reason.startswith(f"instance of series {stray[0].SeriesInstanceUID}, not of the series asked for")
               for _, reason in rejected), rejected
    database.dispose()


def _plan_with(database: Database, states: list[tuple[str, str | None]]) -> tuple[int, list[int]]:
    """A running plan whose studies have these (state, runner); its id and the studies' ids."""
    with database.session() as session:
        plan = BackfillPlan(source="PACS@127.0.0.1:104", query="test", state="running")
        session.add(plan)
        session.flush()
        rows = [BackfillStudy(plan_pk=plan.id, study_instance_uid=f"2.25.{i}", state=state, runner=runner)
                for i, (state, runner) in enumerate(states, start=1)]
        session.add_all(rows)
        session.flush()
        return plan.id, [row.id for row in rows]


def test_concurrent_claims_on_postgresql_take_different_studies(postgres_database: Database) -> None:
    """Two open transactions claim at once: the second neither waits for the first's study (SKIP LOCKED; a lock
    wait would end at lock_timeout and fail the test) nor takes it."""
    plan_id, (first_study, second_study) = _plan_with(postgres_database, [("planned", None), ("planned", None)])
    with postgres_database.session() as first:
        assert claim_planned_study(first, plan_id, "host-a:1") == first_study
        with postgres_database.session() as second:
            second.execute(text("SET LOCAL lock_timeout = '5s'"))
            assert claim_planned_study(second, plan_id, "host-b:1") == second_study
    with postgres_database.session() as third:
        assert claim_planned_study(third, plan_id, "host-c:1") is None
    with postgres_database.session() as session:
        runners = {pk: runner for pk, runner in session.execute(select(BackfillStudy.id, BackfillStudy.runner))}
    assert runners == {first_study: "host-a:1", second_study: "host-b:1"}


def test_a_moving_study_is_taken_over_only_from_a_runner_that_is_gone(database: Database) -> None:
    host = socket.gethostname()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        plan_id, (gone, running, elsewhere, planned) = _plan_with(database, [
            ("moving", f"{host}:{_exited_pid()}"), ("moving", f"{host}:{alive.pid}"), ("moving", "other-host:7"),
            ("planned", None)])
        stale_before = utcnow() - timedelta(hours=1)
        with database.session() as session:  # the runner on another host last advanced its study two hours ago
            session.execute(update(BackfillStudy).where(BackfillStudy.id == elsewhere)
                            .values(updated_at=utcnow() - timedelta(hours=2)))
        with database.session() as session:  # this host's runner whose process is gone: at once
            assert take_over_study(session, plan_id, "me:1", stale_before) == gone
        with database.session() as session:  # its new runner resumes it
            assert take_over_study(session, plan_id, "me:1", stale_before) == gone
        with database.session() as session:  # a live runner here is left alone, a silent one elsewhere is not
            assert take_over_study(session, plan_id, "you:2", stale_before) == elsewhere
        with database.session() as session:
            assert take_over_study(session, plan_id, "third:3", stale_before) is None
            runners = {pk: runner for pk, runner in session.execute(select(BackfillStudy.id, BackfillStudy.runner))}
        assert runners == {gone: "me:1", running: f"{host}:{alive.pid}", elsewhere: "you:2", planned: None}
    finally:
        alive.kill()
        alive.wait()


def _exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_c_move_that_sends_instances_not_asked_for_fails_its_study_and_loses_nothing(tmp_path: Path) -> None:
    """Our listener cannot tell a C-MOVE's instances from a push: every instance is kept (the strays as a live
    study), and the study fails because what arrived of its series does not account for what the PACS sent."""
    from dicom_io.archive import Archive
    from dicom_io.listener import StorageListener
    from worker.ingest import DatabaseSink

    settings = make_settings(tmp_path, min_free_disk_mb=0)
    database = make_database(settings)
    sink = DatabaseSink(Archive(settings.archive_dir), database)
    listener = StorageListener(settings.ae_title, "127.0.0.1", 0, sink)
    listener.start()
    try:
        with fake_pacs() as pacs:
            _serve_studies(pacs, 1, seed=440)
            stray = mr_series(brain_images(1, seed=441), patient_id="STRAY", accession_number="STRAY")
            pacs.strays, pacs.move_destination = stray, ("127.0.0.1", listener.port)
            plan_id = _planned(database, settings, pacs, 1)
            BackfillRunner(settings, database).run_once(threading.Event())
            (asked,) = pacs.series
    finally:
        listener.stop()
    (failure,) = _status(database, plan_id)["failures"]
    assert failure["reason"] == (f"C-MOVE of series {asked}: the PACS reported 2 instance(s) sent, 1 of this series "
                                 "arrived (the others were not of the series asked for)"), failure
    with database.session() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == {str(ds.SOPInstanceUID) for ds in [*pacs.series[asked], *stray]}
    database.dispose()


def _retry_cli(settings: Any, plan_id: int, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(triage_command("backfill", "retry", str(plan_id), *flags, "--data-dir",
                                         str(settings.data_dir)),
                          env=triage_environment(settings.models_dir), capture_output=True, text=True, timeout=120)


def test_backfill_retry_plans_a_refused_study_again_keeping_its_received_series(tmp_path: Path) -> None:
    """The PACS refuses the C-MOVE of one series of a two-series study: the study fails, the plan ends done.
    ``backfill retry`` (the real CLI) plans it again and the plan runs; once the PACS is fixed the study is
    received, its first series never retrieved again and each instance stored once."""
    from dicom_io.archive import Archive
    from dicom_io.listener import StorageListener
    from worker.ingest import DatabaseSink

    settings = make_settings(tmp_path, min_free_disk_mb=0)
    database = make_database(settings)
    listener = StorageListener(settings.ae_title, "127.0.0.1", 0, DatabaseSink(Archive(settings.archive_dir),
                                                                               database))
    listener.start()
    try:
        with fake_pacs() as pacs:
            first = mr_series(brain_images(1, seed=450), patient_id="RETRY-1", accession_number="RETRY1")
            second = mr_series(brain_images(1, seed=451), patient_id="RETRY-1", accession_number="RETRY1",
                               study_instance_uid=str(first[0].StudyInstanceUID), series_number=6)
            for series in (first, second):
                pacs.add_series(series)
            kept, refused = str(first[0].SeriesInstanceUID), str(second[0].SeriesInstanceUID)
            pacs.refused, pacs.move_destination = {refused}, ("127.0.0.1", listener.port)
            plan_id = _planned(database, settings, pacs, 1)
            runner = BackfillRunner(settings, database)
            runner.run_once(threading.Event())
            runner.run_once(threading.Event())  # nothing left planned nor in flight: the plan is done
            plan = _status(database, plan_id)
            assert plan["state"] == "done" and plan["studies"]["failed"] == 1, plan
            assert plan["failures"][0]["reason"].startswith(f"C-MOVE of series {refused}: status 0xA801"), plan

            done = _retry_cli(settings, plan_id)
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.strip() == f"plan {plan_id}: 1 failed studies planned again"
            plan = _status(database, plan_id)
            assert plan["state"] == "running" and plan["studies"]["planned"] == 1 and not plan["failures"], plan

            pacs.refused = set()  # the PACS is fixed
            runner.run_once(threading.Event())
            retrievals = pacs.retrievals()
    finally:
        listener.stop()
    assert _status(database, plan_id)["studies"]["received"] == 1
    assert retrievals == [kept, refused, refused], retrievals  # the received series was not retrieved again
    with database.session() as session:
        stored = sorted(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == sorted(str(ds.SOPInstanceUID) for ds in [*first, *second])
    database.dispose()


def test_backfill_retry_leaves_cancelled_studies_unless_asked(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    database = make_database(settings)
    plan_id, (refused, cancelled, cut_off, received) = _plan_with(
        database, [("failed", None), ("failed", None), ("failed", None), ("received", None)])
    with database.session() as session:
        for pk, reason in ((refused, "C-MOVE of series 2.25.9: status 0xA801"), (cancelled, "cancelled"),
                           (cut_off, "cancelled during retrieval")):
            session.execute(update(BackfillStudy).where(BackfillStudy.id == pk).values(reason=reason))
        session.execute(update(BackfillPlan).where(BackfillPlan.id == plan_id).values(state="cancelled"))

    def states() -> dict[int, str]:
        with database.session() as session:
            return dict(session.execute(select(BackfillStudy.id, BackfillStudy.state)).all())

    done = _retry_cli(settings, plan_id)
    assert done.returncode == 0 and done.stdout.strip() == f"plan {plan_id}: 1 failed studies planned again"
    assert states() == {refused: "planned", cancelled: "failed", cut_off: "failed", received: "received"}
    assert _status(database, plan_id)["state"] == "running"
    done = _retry_cli(settings, plan_id, "--include-cancelled")
    assert done.returncode == 0 and done.stdout.strip() == f"plan {plan_id}: 2 failed studies planned again"
    assert states() == {refused: "planned", cancelled: "planned", cut_off: "planned", received: "received"}
    missing = _retry_cli(settings, plan_id + 1)
    assert missing.returncode == 1 and f"no backfill plan {plan_id + 1}" in missing.stderr
    database.dispose()
