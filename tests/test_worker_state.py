"""The worker's state on a real database (SQLite file and a fresh PostgreSQL database): migrations, ingest,
series completion, job transitions and superseding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom import Dataset
from sqlalchemy import func, inspect, select, text, update

from config import RoutingRule, load_settings
from dicom_factory import brain_images, ct_images
from dicom_io.archive import Archive
from dicom_io.synthesis import ct_series, mr_series
from models.tasks import INDETERMINATE
from worker.db import Base, Database, Instance, Job, JobState, Patient, RejectedInstance, Result, Series, WorkerProcess
from worker.db import Study, upgrade_database
from worker.db.migrate import alembic_config
from worker.ingest import DatabaseSink
from worker.inference import SeriesClassification
from worker.report import format_report, results_report
from worker.series import SeriesScheduler
from worker.tasks import claim_job, fail_job, finish_job
from worker.workers import STALE_AFTER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sink(database: Database, tmp_path: Path) -> DatabaseSink:
    return DatabaseSink(Archive(tmp_path / "archive"), database)


class Clock:
    """A settable clock for the scheduler (real time would make the quiet period slow and flaky to test)."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _scheduler(database: Database, tmp_path: Path, clock: Clock, sent: list[int], **settings: object) -> SeriesScheduler:
    values = {"data_dir": tmp_path, "series_quiet_seconds": 5.0, **settings}
    return SeriesScheduler(load_settings(env={}, **values), database, sent.append, clock=clock)


def _brain(count: int, **kwargs: object) -> list[Dataset]:
    return mr_series(brain_images(count), **kwargs)


def test_upgrade_is_idempotent_and_matches_the_models(database_url: str) -> None:
    upgrade_database(database_url)
    upgrade_database(database_url)  # a second process starting: nothing to do, no error
    db = Database(database_url)
    try:
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == [], f"the models changed without a migration: {diff}"
    finally:
        db.dispose()


def test_concurrent_upgrades(database_url: str, tmp_path: Path) -> None:
    # On SQLite the race is over a new file's switch to WAL mode (it lost about one time in 15): many new files.
    urls = ([f"sqlite:///{tmp_path / f'new-{n}.sqlite3'}" for n in range(100)] if database_url.startswith("sqlite")
            else [database_url])
    errors: list[BaseException] = []

    def upgrade(url: str) -> None:
        try:
            upgrade_database(url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for url in urls:
        threads = [threading.Thread(target=upgrade, args=(url,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_ingest_records_rows_and_is_idempotent(database: Database, sink: DatabaseSink) -> None:
    series = _brain(3)
    for ds in series:
        ds.PatientName = "Alpha^Ann"
        assert sink.accept(ds, "MODALITY1") == 0x0000
    assert sink.accept(series[0], "MODALITY1") == 0x0000  # repeated SOP Instance UID
    fresh = DatabaseSink(sink.archive, database)  # another listener process: no cache
    assert fresh.accept(series[1], "MODALITY2") == 0x0000
    with database.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID for ds in series]
        assert {r.calling_ae for r in rows} == {"MODALITY1"}
        assert all(Path(r.archive_path).is_file() for r in rows)
        assert rows[0].transfer_syntax_uid == series[0].file_meta.TransferSyntaxUID
        row = session.scalars(select(Series)).one()
        assert (row.modality, row.body_part_examined, row.pending) == ("MR", "BRAIN", True)
        assert "ORIGINAL" in row.image_types.split("\\")
        assert session.scalars(select(Patient.patient_name)).one() == "Alpha^Ann"  # not split into letters


def test_reject_is_recorded(sink: DatabaseSink, database: Database) -> None:
    sink.reject("EVIL_AE", None, "association rejected: calling AE title 'EVIL_AE' is not allowed")
    sink.reject("CT1", "1.2.3.4", "0xC000: cannot parse dataset")
    with database.session() as session:
        rows = session.scalars(select(RejectedInstance).order_by(RejectedInstance.id)).all()
        assert [(r.calling_ae, r.sop_instance_uid) for r in rows] == [("EVIL_AE", ""), ("CT1", "1.2.3.4")]


def test_concurrent_ingest_from_many_associations(database: Database, sink: DatabaseSink) -> None:
    # Four "associations" sending interleaved instances of two series at once: no lock errors, nothing lost.
    study = "1.2.826.0.1.3680043.8.498.1"
    a = _brain(8, study_instance_uid=study)
    b = _brain(8, study_instance_uid=study, series_description="AX T2")
    datasets = a + b
    errors: list[BaseException] = []

    def send(part: list[Dataset]) -> None:
        try:
            for ds in part:
                assert sink.accept(ds, "PACS") == 0
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(datasets[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with database.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 16
        assert session.scalar(select(func.count(Series.id))) == 2


def test_series_waits_for_quiet_time_then_is_routed(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    for ds in _brain(2):
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=4)
    assert scheduler.run_once() == [] and sent == []
    clock.now += timedelta(seconds=2)
    [job_id] = scheduler.run_once()
    assert sent == [job_id]
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.task, job.revision, job.instance_count) == (JobState.QUEUED, "brain-tumor", 1, 2)
        assert session.scalars(select(Series)).one().pending is False
    assert scheduler.run_once() == [] and sent == [job_id]  # nothing new


def test_unmatched_modality_is_not_applicable_with_reason(
    database: Database, sink: DatabaseSink, tmp_path: Path
) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    for ds in ct_series(ct_images(2), body_part="KNEE"):
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [job_id] = scheduler.run_once()
    assert sent == []
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.NOT_APPLICABLE and job.task is None
        assert "body part KNEE" in job.reason and "modality CT not in MR" in job.reason


def test_min_slices_and_localizer_rules(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    rules = (RoutingRule(task="brain-tumor", modalities=("MR",), min_slices=3),)
    scheduler = _scheduler(database, tmp_path, clock, sent, routing_rules=rules)
    scout = _brain(1)
    scout[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    for ds in _brain(2) + scout:
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    created = scheduler.run_once()
    with database.session() as session:
        reasons = sorted(session.get_one(Job, j).reason for j in created)
    assert reasons == ["no routing rule matches (brain-tumor: 2 slice(s), fewer than 3)",
                       "no routing rule matches (brain-tumor: image type LOCALIZER is excluded)"]


def test_a_secondary_capture_series_is_not_applicable(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    # The scheduler gathers the series' SOP classes from its instances: one Secondary Capture among MR images
    # is enough to refuse the series (a screen capture filed into it).
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    series = _brain(3)
    series[2].SOPClassUID = series[2].file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    for ds in series:
        assert sink.accept(ds, "PACS") == 0x0000
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [job_id] = scheduler.run_once()
    assert sent == []
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.NOT_APPLICABLE
        assert "SOP class Secondary Capture Image Storage is excluded" in job.reason


def test_instance_arriving_while_scheduling_wins(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    series = _brain(2)
    sink.accept(series[0], "PACS")
    with database.session() as session:
        series_pk, seen = session.execute(select(Series.id, Series.last_received_at)).one()
    sink.accept(series[1], "PACS")  # arrives after the scheduler looked
    assert scheduler._open_job(series_pk, seen) is None


def _classification(label: str = "glioma") -> SeriesClassification:
    probabilities = {"glioma": 0.1, "meningioma": 0.1, "notumor": 0.1, "pituitary": 0.1} | {label: 0.7}
    return SeriesClassification(label, probabilities, [{"sop_instance_uid": "1.2", "frame": 1, "probabilities": [0.25] * 4}])


def _worker(database: Database, heartbeat: datetime | None = None) -> int:
    with database.session() as session:
        row = WorkerProcess(hostname="elsewhere", pid=1, heartbeat_at=heartbeat or datetime.now(timezone.utc))
        session.add(row)
        session.flush()
        return row.id


def test_job_lifecycle_is_idempotent(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    for ds in _brain(2):
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [job_id] = scheduler.run_once()
    me, other = _worker(database), _worker(database)
    claimed = claim_job(database, job_id, me)
    assert claimed is not None and claimed.task == "brain-tumor" and len(claimed.paths) == 2
    assert claim_job(database, job_id, other) is None  # duplicate delivery while a live worker holds it
    for _ in range(2):  # a retried task finishing twice makes one result
        finish_job(database, job_id, _classification(), "tiny", "1", "2.25.1", 0.1)
    assert claim_job(database, job_id, other) is None  # done
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.DONE and job.attempts == 1 and job.finished_at is not None
        assert session.scalar(select(func.count(Result.id))) == 1


def test_dead_worker_jobs_are_requeued(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    for ds in _brain(1):
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [job_id] = scheduler.run_once()
    alive = _worker(database)
    assert claim_job(database, job_id, alive) is not None
    assert scheduler.requeue_orphans() == 0
    with database.session() as session:  # the worker stops heartbeating
        session.execute(
            update(WorkerProcess).where(WorkerProcess.id == alive).values(heartbeat_at=clock.now - 2 * STALE_AFTER)
        )
    scheduler.run_once()
    assert sent == [job_id, job_id]
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.QUEUED and job.worker_pk is None and "re-queued" in job.reason
    assert claim_job(database, job_id, _worker(database)) is not None


def test_late_instance_reruns_and_supersedes(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    series = _brain(3)
    for ds in series[:2]:
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [first] = scheduler.run_once()
    worker = _worker(database)
    claim_job(database, first, worker)
    finish_job(database, first, _classification("glioma"), "tiny", "1", "2.25.1", 0.1)
    sink.accept(series[2], "PACS")  # late
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [second] = scheduler.run_once()
    claimed = claim_job(database, second, worker)
    assert claimed is not None and len(claimed.paths) == 3
    finish_job(database, second, _classification("meningioma"), "tiny", "1", "2.25.1", 0.1)
    with database.session() as session:
        results = session.scalars(select(Result).order_by(Result.revision)).all()
        assert [(r.revision, r.label) for r in results] == [(1, "glioma"), (2, "meningioma")]
        assert results[0].superseded_by_pk == results[1].id and results[1].superseded_by_pk is None


def test_older_revision_finishing_last_is_superseded_at_once(
    database: Database, sink: DatabaseSink, tmp_path: Path
) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    series = _brain(2)
    sink.accept(series[0], "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [first] = scheduler.run_once()
    sink.accept(series[1], "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [second] = scheduler.run_once()
    w1, w2 = _worker(database), _worker(database)
    claim_job(database, first, w1)
    claim_job(database, second, w2)
    finish_job(database, second, _classification("pituitary"), "tiny", "1", "2.25.1", 0.1)
    finish_job(database, first, _classification("glioma"), "tiny", "1", "2.25.1", 0.1)
    with database.session() as session:
        current = session.scalars(select(Result).where(Result.superseded_by_pk.is_(None))).all()
        assert [(r.revision, r.label) for r in current] == [(2, "pituitary")]


def test_failed_job_keeps_its_reason(database: Database, sink: DatabaseSink, tmp_path: Path) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    for ds in _brain(1):
        sink.accept(ds, "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [job_id] = scheduler.run_once()
    claim_job(database, job_id, _worker(database))
    fail_job(database, job_id, "ImagingError: the dataset has no Pixel Data")
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.FAILED and "no Pixel Data" in job.reason


def test_a_bad_row_fails_alone_in_a_group_commit(database: Database, sink: DatabaseSink) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite stores any integer; PostgreSQL refuses one out of range")
    series = _brain(12)
    series[5].InstanceNumber = 2**40  # IS allows it; an INTEGER column does not
    outcomes: dict[str, object] = {}

    def send(part: list[Dataset]) -> None:
        for ds in part:
            try:
                outcomes[ds.SOPInstanceUID] = sink.accept(ds, "PACS")
            except Exception as exc:  # noqa: BLE001 - the listener turns it into a failure status
                outcomes[ds.SOPInstanceUID] = exc

    threads = [threading.Thread(target=send, args=(series[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = series[5].SOPInstanceUID
    assert "out of range" in str(outcomes.pop(bad))
    assert set(outcomes.values()) == {0}
    with database.session() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert recorded == {ds.SOPInstanceUID for ds in series} - {bad}


def test_ingest_goes_on_after_its_database_connection_is_lost(
    postgres_database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The sink keeps one connection between commits; a server restart or an idle timeout ends it. The store that
    # finds it gone must still be recorded and succeed, on a new connection, and so must the next.
    sink = DatabaseSink(Archive(tmp_path / "archive"), postgres_database)
    series = _brain(3)
    assert sink.accept(series[0], "PACS") == 0
    with postgres_database.engine.connect() as admin:
        ended = admin.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        ).scalar_one()
    assert ended >= 1  # the sink's own connection among them
    with caplog.at_level("WARNING", logger="worker.ingest"):
        assert sink.accept(series[1], "PACS") == 0
    assert "connection was lost" in caplog.text
    assert sink.accept(series[2], "PACS") == 0
    sink.close()
    with postgres_database.session() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert recorded == {ds.SOPInstanceUID for ds in series}


def _indeterminate(reason: str = "no lung in the field of view") -> SeriesClassification:
    """What the worker's classification gives for a series the model cannot judge: every class' probability
    still, one slice left out of the decision."""
    probabilities = {"glioma": 0.2, "meningioma": 0.3, "notumor": 0.4, "pituitary": 0.1}
    slices = [{"sop_instance_uid": "1.2", "frame": 1, "probabilities": [0.25] * 4, "excluded": "scout"}]
    return SeriesClassification(INDETERMINATE, probabilities, slices, reason=reason)


def _results_json(database_url: str, data_dir: Path) -> dict[str, Any]:
    """``dicom-triage results --json``, the command itself."""
    completed = subprocess.run(
        [sys.executable, "-m", "worker.cli", "results", "--data-dir", str(data_dir), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DICOM_TRIAGE_CONFIG": "", "DICOM_TRIAGE_DATABASE_URL": database_url},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_indeterminate_result_keeps_its_reason_through_results(
    database: Database, database_url: str, sink: DatabaseSink, tmp_path: Path
) -> None:
    clock, sent = Clock(), []
    scheduler = _scheduler(database, tmp_path, clock, sent)
    series = _brain(2)
    sink.accept(series[0], "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [first] = scheduler.run_once()
    worker = _worker(database)
    claim_job(database, first, worker)
    finish_job(database, first, _indeterminate(), "tiny", "1", "2.25.1", 0.1)
    with database.session() as session:
        result = session.scalars(select(Result)).one()
        assert (result.label, result.reason) == (INDETERMINATE, "no lung in the field of view")
        assert result.probabilities["notumor"] == 0.4 and result.slice_probabilities[0]["excluded"] == "scout"
        job = session.get_one(Job, first)
        assert job.state == JobState.DONE
        assert job.reason == "indeterminate (no lung in the field of view) by tiny 1"

    [entry] = _results_json(database_url, tmp_path)["series"]
    assert entry["label"] == INDETERMINATE and entry["result_reason"] == "no lung in the field of view"
    assert entry["reason"] == "indeterminate (no lung in the field of view) by tiny 1"
    assert entry["probabilities"]["notumor"] == 0.4
    text_lines = format_report(results_report(database)).splitlines()
    assert "indeterminate" in text_lines[1] and "no lung in the field of view" in text_lines[1]

    # A late instance makes a new revision with a class label: the series' current result has no reason.
    sink.accept(series[1], "PACS")
    clock.now = datetime.now(timezone.utc) + timedelta(seconds=10)
    [second] = scheduler.run_once()
    claim_job(database, second, worker)
    finish_job(database, second, _classification("glioma"), "tiny", "1", "2.25.1", 0.1)
    [entry] = results_report(database)["series"]
    assert (entry["label"], entry["result_reason"]) == ("glioma", None)
    assert entry["reason"] == "glioma (0.70) by tiny 1"
    assert "glioma 0.70" in format_report(results_report(database))


def test_result_reason_migration_keeps_existing_results(database_url: str) -> None:
    """``res0001`` adds ``results.reason`` to a database holding results (they read NULL) and removes it again."""
    upgrade_database(database_url)
    db = Database(database_url)
    try:
        with db.session() as session:
            patient = Patient(patient_id="P1")
            study = Study(study_instance_uid="1.2.3", patient=patient)
            series = Series(series_instance_uid="1.2.3.4", study=study)
            session.add_all([patient, study, series])
            session.flush()
            job = Job(series_pk=series.id, revision=1, state=JobState.DONE, task="brain-tumor",
                      series_last_received_at=datetime.now(timezone.utc))
            session.add(job)
            session.flush()
            session.add(Result(job_pk=job.id, series_pk=series.id, revision=1, task="brain-tumor", label="glioma",
                               probabilities={"glioma": 1.0}, slice_probabilities=[], aggregation="mean",
                               model_name="m", model_version="1", model_uid="2.25.1"))
        with db.engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "reg0001")
        assert "reason" not in {c["name"] for c in inspect(db.engine).get_columns("results")}
        upgrade_database(database_url)
        with db.engine.connect() as connection:
            rows = connection.execute(text("SELECT label, reason FROM results")).all()
            assert [tuple(row) for row in rows] == [("glioma", None)]
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        with db.session() as session:  # the column takes text of any length
            session.execute(update(Result).values(label=INDETERMINATE, reason="not a brain " * 100))
            assert session.scalars(select(Result.reason)).one() == "not a brain " * 100
    finally:
        db.dispose()
