"""SRs for results: archived, recorded, revised, and delivered by the real delivery worker to dcmtk's storescp.

storescp listens on every interface, so it runs inside a fresh network namespace (``unshare -n``, loopback only)
and so does the ``dicom-triage worker --queue delivery`` process that sends to it (``nsenter``). The test process
publishes SRs into the same SQLite database and filesystem broker, from results recorded by the real ingest sink
and ``finish_job``; no TensorFlow is needed here (the full pipeline is in test_orthanc_roundtrip.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select

from config import Destination, Settings, load_settings
from dicom_factory import brain_images, ct_images
from dicom_io.archive import Archive
from dicom_io.sr import read_classification_sr
from dicom_io.synthesis import ct_series, mr_series
from models.tasks import get_task
from processes import Child, NetworkNamespace, celery_ready, triage_command, wait_for
from worker import reporting
from worker.db import (
    Database, Job, JobState, Result, Series, SrDelivery, SrDocument, User, upgrade_database, utcnow,
)
from worker.db.review import Decision, record_decision
from worker.delivery import backoff_seconds, resume_deliveries
from worker.inference import SeriesClassification
from worker.ingest import DatabaseSink
from worker.report import results_report
from worker.reporting import publish_missing, publish_result, publish_review
from worker.tasks import finish_job

ROOT = Path(__file__).resolve().parents[1]
DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
STORESCP = "/usr/bin/storescp"
MODEL_UID = "2.25.314159265358979323846264338327950288"
#: Delivery retries in these tests: 0.2, 0.4, 0.8, 1, 1 ... s; failed after 8 attempts (about 6 s).
RETRY_SETTINGS = {"sr_delivery_backoff_seconds": 0.2, "sr_delivery_backoff_max_seconds": 1.0,
                  "sr_delivery_max_attempts": 8}


# --- storescp, delivery worker ----------------------------------------------------------------------------------

def start_storescp(netns: NetworkNamespace, port: int, directory: Path, *options: str,
                   ae_title: str = "STORESCP") -> Child:
    """dcmtk's storescp in the namespace, verbose (one "Association Received" line per association)."""
    directory.mkdir(parents=True, exist_ok=True)
    process = Child([STORESCP, "-v", "-aet", ae_title, "-od", str(directory), *options, str(port)], netns=netns)
    deadline = time.monotonic() + 20
    while netns.run(["sh", "-c", f"ss -ltn | grep -q ':{port} '"]).returncode != 0:
        assert process.popen.poll() is None and time.monotonic() < deadline, process.output
        time.sleep(0.05)
    return process


def associations(storescp: Child) -> int:
    return storescp.output.count("Association Received")


def received(directory: Path) -> dict[str, Path]:
    """Files storescp wrote, by SOP Instance UID."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in directory.iterdir() if p.is_file()}


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def delivery_environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update({f"DICOM_TRIAGE_{key.upper()}": str(value) for key, value in RETRY_SETTINGS.items()})
    env.update(DICOM_TRIAGE_AE_TITLE=settings.ae_title)
    return env


# --- results as the worker records them -------------------------------------------------------------------------

@dataclass
class World:
    netns: NetworkNamespace
    settings: Settings
    database: Database
    sink: DatabaseSink
    delivery_worker: Child

    def with_destinations(self, *destinations: str) -> Settings:
        return self.settings.model_copy(update={"sr_destinations": tuple(map(Destination.parse, destinations))})

    def deliveries(self, document_pk: int) -> dict[str, SrDelivery]:
        with self.database.session() as session:
            rows = session.scalars(select(SrDelivery).where(SrDelivery.document_pk == document_pk)).all()
            return {row.destination.split("@")[0]: row for row in rows}


def ingest(world: World, datasets: list[Dataset]) -> None:
    for ds in datasets:
        assert world.sink.accept(ds, "MODALITY") == 0


def record_result(database: Database, datasets: list[Dataset], label: str | None = None) -> int:
    """A finished job for the series with its result, through ``finish_job``; returns the result's id."""
    series_uid = datasets[0].SeriesInstanceUID
    task = get_task("brain-tumor" if datasets[0].Modality == "MR" else "covid-ct")
    label = label or task.class_names[0]
    probabilities = {name: (0.7 if name == label else round(0.3 / (task.num_classes - 1), 6))
                     for name in task.class_names}
    with database.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one()
        series.revision += 1
        series.pending = False
        job = Job(series_pk=series.id, revision=series.revision, state=JobState.RUNNING, task=task.name,
                  series_last_received_at=utcnow(), instance_count=len(datasets))
        session.add(job)
        session.flush()
        job_pk = job.id
    classification = SeriesClassification(
        label=label,
        probabilities=probabilities,
        slice_probabilities=[{"sop_instance_uid": ds.SOPInstanceUID, "frame": 1,
                              "probabilities": [probabilities[n] for n in task.class_names]} for ds in datasets],
    )
    finish_job(database, job_pk, classification, model_name=f"test-{task.name}", model_version="1.0.0",
               model_uid=MODEL_UID, seconds=0.1)
    with database.session() as session:
        return int(session.scalars(select(Result.id).where(Result.job_pk == job_pk)).one())


def check_sr_matches_result(path: Path, database: Database, result_pk: int, label: str | None = None) -> None:
    """dciodvfy accepts the SR, dsrdump renders it, and its finding and probabilities are the database row's."""
    assert dciodvfy_errors(path) == []
    dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Comprehensive 3D SR" in dump.stdout, dump.stderr
    report = read_classification_sr(pydicom.dcmread(path))
    with database.session() as session:
        result = session.get_one(Result, result_pk)
        assert report.finding == (label or result.label)
        assert report.probabilities == result.probabilities
        assert report.algorithm.uid == result.model_uid
        assert {uid for _, uid in report.referenced_instances} == {
            s["sop_instance_uid"] for s in result.slice_probabilities}


def start_delivery_worker(netns: NetworkNamespace, settings: Settings) -> Child:
    worker = Child(triage_command("worker", "--queue", "delivery", "--data-dir", str(settings.data_dir)),
                   delivery_environment(settings), name="worker", netns=netns)
    worker.wait_for_line(celery_ready, 120, "the delivery worker")
    return worker


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("sr-delivery")
    settings = load_settings(env={}, data_dir=tmp / "data", ae_title="TRIAGE_SR", **RETRY_SETTINGS)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    netns = NetworkNamespace()
    world = None
    try:
        world = World(netns, settings, database, DatabaseSink(Archive(settings.archive_dir), database),
                      start_delivery_worker(netns, settings))
        yield world
    finally:
        if world is not None:
            world.delivery_worker.stop()
        netns.close()
        database.dispose()


@pytest.fixture
def storescps(world: World) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for process in started:
        process.stop()


# --- tests ------------------------------------------------------------------------------------------------------

def test_sr_is_archived_recorded_and_reaches_every_destination_even_with_one_down(
    world: World, storescps: list[Child], tmp_path: Path
) -> None:
    series = mr_series(brain_images(3, seed=21))
    ingest(world, series)
    result_pk = record_result(world.database, series, label="meningioma")
    storescps.append(start_storescp(world.netns, 11201, tmp_path / "a", ae_title="STORE_A"))
    settings = world.with_destinations("STORE_A@127.0.0.1:11201", "STORE_B@127.0.0.1:11202")

    published = publish_result(world.database, settings, result_pk)
    assert published is not None and published.created and published.revision == 0
    check_sr_matches_result(published.archive_path, world.database, result_pk)
    assert published.archive_path.parent.parent.name == series[0].StudyInstanceUID  # archived in the same study

    # A receives it; B is down: its attempts fail with the reason, spaced by the backoff.
    wait_for(lambda: world.deliveries(published.document_pk)["STORE_A"].status == "sent", 30, "delivery to A",
             world.delivery_worker)
    wait_for(lambda: world.deliveries(published.document_pk)["STORE_B"].attempts >= 2, 30, "retries to B",
             world.delivery_worker)
    down = world.deliveries(published.document_pk)["STORE_B"]
    assert down.status == "pending" and "no association" in down.error, down.error
    assert down.next_attempt_at is not None
    assert received(tmp_path / "a").keys() == {published.sop_instance_uid}

    # B comes back: its next attempt succeeds, with the same SR.
    storescps.append(start_storescp(world.netns, 11202, tmp_path / "b", ae_title="STORE_B"))
    wait_for(lambda: world.deliveries(published.document_pk)["STORE_B"].status == "sent", 30, "delivery to B",
             world.delivery_worker)
    done = world.deliveries(published.document_pk)
    assert done["STORE_A"].attempts == 1 and done["STORE_A"].error == ""
    assert 2 <= done["STORE_B"].attempts < world.settings.sr_delivery_max_attempts and done["STORE_B"].error == ""
    copy_b = received(tmp_path / "b")[published.sop_instance_uid]
    assert pydicom.dcmread(copy_b) == pydicom.dcmread(published.archive_path)
    assert dciodvfy_errors(copy_b) == []
    assert [associations(p) for p in storescps] == [1, 1]


def test_refusing_destinations_are_retried_with_backoff_then_given_up_with_the_reason(
    world: World, storescps: list[Child], tmp_path: Path
) -> None:
    profile = tmp_path / "mr-only.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[MROnly]\nPresentationContext1 = MRImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[MROnly]\nPresentationContexts = MROnly\n"
    )
    refuse = start_storescp(world.netns, 11211, tmp_path / "refuse", "--refuse", ae_title="REFUSE")
    no_sr = start_storescp(world.netns, 11212, tmp_path / "no-sr", "-xf", str(profile), "MROnly", ae_title="NO_SR")
    abort = start_storescp(world.netns, 11213, tmp_path / "abort", "--abort-after", ae_title="ABORT")
    storescps += [refuse, no_sr, abort]
    series = ct_series(ct_images(2, seed=22))
    ingest(world, series)
    result_pk = record_result(world.database, series)
    settings = world.with_destinations("REFUSE@127.0.0.1:11211", "NO_SR@127.0.0.1:11212", "ABORT@127.0.0.1:11213")

    started = time.monotonic()
    published = publish_result(world.database, settings, result_pk)
    assert published is not None
    wait_for(lambda: all(d.status == "failed" for d in world.deliveries(published.document_pk).values()), 60,
             "every delivery to give up", world.delivery_worker)
    elapsed = time.monotonic() - started

    attempts = world.settings.sr_delivery_max_attempts
    deliveries = world.deliveries(published.document_pk)
    assert {name: d.attempts for name, d in deliveries.items()} == dict.fromkeys(deliveries, attempts)
    assert "association rejected" in deliveries["REFUSE"].error
    assert "accepted no presentation context (refused Comprehensive 3D SR Storage)" in deliveries["NO_SR"].error
    assert "no response" in deliveries["ABORT"].error or "aborted" in deliveries["ABORT"].error
    # Bounded: exactly one association per attempt, and the attempts waited for the backoff between them. A thread
    # reads each storescp's output: under load it may not have read the last attempt's line yet.
    peers = (refuse, no_sr, abort)
    wait_for(lambda: all(associations(p) >= attempts for p in peers), 10, "each peer's log of every attempt", *peers)
    assert [associations(p) for p in peers] == [attempts] * 3
    assert elapsed >= sum(backoff_seconds(world.settings, n) for n in range(1, attempts))
    assert all(not received(tmp_path / name) for name in ("refuse", "no-sr", "abort"))


def test_revisions_name_their_predecessor_and_publishing_twice_makes_one_sr(
    world: World, storescps: list[Child], tmp_path: Path
) -> None:
    storescps.append(start_storescp(world.netns, 11221, tmp_path / "pacs", ae_title="PACS"))
    settings = world.with_destinations("PACS@127.0.0.1:11221")
    series = mr_series(brain_images(3, seed=23))
    ingest(world, series)
    first_pk = record_result(world.database, series, label="glioma")

    first = publish_result(world.database, settings, first_pk)
    again = publish_result(world.database, settings, first_pk)
    assert first is not None and again is not None and not again.created
    assert (again.document_pk, again.sop_instance_uid, again.delivery_pks) == (
        first.document_pk, first.sop_instance_uid, first.delivery_pks)

    # A radiologist corrects the label: revision 1 reports the correction and names revision 0.
    with world.database.session() as session:
        user = User(name=f"radiologist-{first_pk}", role="radiologist", password_hash="x")
        session.add(user)
        session.flush()
        review_pk = record_decision(session, session.get_one(Result, first_pk), user, Decision.CORRECT, "pituitary").id
    corrected = publish_review(world.database, settings, review_pk)
    assert corrected is not None and corrected.created and corrected.revision == 1
    check_sr_matches_result(corrected.archive_path, world.database, first_pk, label="pituitary")
    assert read_classification_sr(pydicom.dcmread(corrected.archive_path)).predecessors == (first.sop_instance_uid,)
    assert publish_review(world.database, settings, review_pk).created is False  # type: ignore[union-attr]

    # A late instance makes a new result: the old one is superseded (no SR), the new one is revision 2.
    late = mr_series(brain_images(1, seed=24), study_instance_uid=series[0].StudyInstanceUID,
                     series_instance_uid=series[0].SeriesInstanceUID)
    ingest(world, late)
    second_pk = record_result(world.database, series + late, label="notumor")
    assert publish_result(world.database, settings, first_pk) is None
    second = publish_result(world.database, settings, second_pk)
    assert second is not None and second.revision == 2
    check_sr_matches_result(second.archive_path, world.database, second_pk)
    second_sr = pydicom.dcmread(second.archive_path)
    assert read_classification_sr(second_sr).predecessors == (corrected.sop_instance_uid,)
    assert second_sr.SeriesInstanceUID == pydicom.dcmread(first.archive_path).SeriesInstanceUID
    assert len(read_classification_sr(second_sr).referenced_instances) == 4
    with world.database.session() as session:
        documents = session.scalars(select(SrDocument).where(SrDocument.result_pk.in_([first_pk, second_pk]))
                                    .order_by(SrDocument.id)).all()
        assert [d.predecessor_pk for d in documents] == [None, documents[0].id, documents[1].id]

    # Every revision reaches the PACS; results --json shows the current one with its delivery.
    wait_for(lambda: len(received(tmp_path / "pacs")) == 3, 30, "three SRs at the PACS", world.delivery_worker)
    assert set(received(tmp_path / "pacs")) == {first.sop_instance_uid, corrected.sop_instance_uid,
                                                second.sop_instance_uid}
    # The PACS has the file before the delivery task records its answer: wait for the record too.
    def current_sr() -> dict:
        (entry,) = results_report(world.database, series[0].StudyInstanceUID)["series"]
        return entry["sr"]

    wait_for(lambda: current_sr()["deliveries"][0]["status"] != "pending", 30, "the delivery recorded",
             world.delivery_worker)
    assert current_sr()["sop_instance_uid"] == second.sop_instance_uid
    assert current_sr()["deliveries"] == [
        {"destination": "PACS@127.0.0.1:11221", "status": "sent", "attempts": 1, "error": None}]

    shown = subprocess.run([sys.executable, "-m", "worker.cli", "sr", "show", str(second.archive_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "Finding: notumor" in shown.stdout and f"replaces {corrected.sop_instance_uid}" in shown.stdout
    assert all(ds.SOPInstanceUID in shown.stdout for ds in series + late)
    not_sr = subprocess.run([sys.executable, "-m", "worker.cli", "sr", "show", str(tmp_path / "pacs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert not_sr.returncode == 1 and "cannot read a DICOM file" in not_sr.stderr
    assert "Traceback" not in not_sr.stderr


@pytest.mark.filterwarnings("ignore:The (value|PN component) length", "ignore:Invalid value for VR")
def test_bad_source_headers_still_give_valid_srs_that_are_delivered(
    world: World, storescps: list[Child], tmp_path: Path
) -> None:
    storescps.append(start_storescp(world.netns, 11231, tmp_path / "pacs", ae_title="PACS"))
    settings = world.with_destinations("PACS@127.0.0.1:11231")
    missing = mr_series(brain_images(2, seed=25))
    for ds in missing:
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                        "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
            if keyword in ds:
                delattr(ds, keyword)
    foreign = ct_series(ct_images(2, seed=26), patient_name="Müller-Lüdenscheidt^" + "Jürgen" * 20 + "=山田^太郎",
                        study_description="Thorax-CT ohne Kontrastmittel " * 5)
    for ds in foreign:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ReferringPhysicianName = "Åström^Øyvind"
    published = []
    for datasets in (missing, foreign):
        ingest(world, datasets)
        result_pk = record_result(world.database, datasets)
        sr = publish_result(world.database, settings, result_pk)
        assert sr is not None
        check_sr_matches_result(sr.archive_path, world.database, result_pk)
        published.append(sr)
    foreign_sr = pydicom.dcmread(published[1].archive_path)
    assert foreign_sr.PatientName.family_name == "Müller-Lüdenscheidt"
    assert len(str(foreign_sr.PatientName).encode()) <= 64 and foreign_sr.PatientName.ideographic == "山田^太郎"
    assert pydicom.dcmread(published[0].archive_path).PatientName == ""

    wait_for(lambda: len(received(tmp_path / "pacs")) == 2, 30, "both SRs at the PACS", world.delivery_worker)
    for sr in published:
        assert dciodvfy_errors(received(tmp_path / "pacs")[sr.sop_instance_uid]) == []


def test_missing_srs_are_made_at_start_and_pending_deliveries_resume(world: World, tmp_path: Path) -> None:
    series = ct_series(ct_images(2, seed=27))
    ingest(world, series)
    result_pk = record_result(world.database, series)
    queued: list[tuple[int, float]] = []
    settings = world.with_destinations("LATER@127.0.0.1:11241")
    made = publish_missing(world.database, settings, enqueue=lambda pk, countdown: queued.append((pk, countdown)))
    assert made >= 1
    with world.database.session() as session:
        document = session.scalars(select(SrDocument).where(SrDocument.result_pk == result_pk)).one()
        (delivery,) = session.scalars(select(SrDelivery).where(SrDelivery.document_pk == document.id)).all()
    assert (delivery.id, 0.0) in queued and delivery.status == "pending" and delivery.attempts == 0
    assert publish_missing(world.database, settings, enqueue=lambda pk, countdown: queued.append((pk, countdown))) == 0

    # The delivery worker's start (and its sweep) re-sends a message for every pending delivery.
    resent: list[tuple[int, float]] = []
    assert resume_deliveries(world.database, lambda pk, countdown: resent.append((pk, countdown))) >= 1
    assert (delivery.id, 0.0) in resent
    assert resume_deliveries(world.database, lambda pk, countdown: None, overdue=timedelta(hours=1)) == 0
    assert backoff_seconds(world.settings, 1) == 0.2 and backoff_seconds(world.settings, 50) == 1.0


def test_a_killed_delivery_worker_loses_no_delivery(world: World, storescps: list[Child], tmp_path: Path) -> None:
    settings = world.with_destinations("LATE@127.0.0.1:11251")
    series = mr_series(brain_images(2, seed=30))
    ingest(world, series)
    published = publish_result(world.database, settings, record_result(world.database, series))
    assert published is not None
    wait_for(lambda: world.deliveries(published.document_pk)["LATE"].error, 30, "a failed attempt",
             world.delivery_worker)
    world.delivery_worker.popen.kill()
    world.delivery_worker.popen.wait()

    # The retry message died with the worker (the filesystem broker forgets fetched messages), and no process is
    # left to send it: the delivery stays pending (no sleep here could show more: nothing runs that could send)...
    storescps.append(start_storescp(world.netns, 11251, tmp_path / "late", ae_title="LATE"))
    assert world.deliveries(published.document_pk)["LATE"].status == "pending" and not received(tmp_path / "late")
    # ... until a delivery worker starts again and resumes every pending delivery.
    world.delivery_worker = start_delivery_worker(world.netns, world.settings)
    wait_for(lambda: world.deliveries(published.document_pk)["LATE"].status == "sent", 30, "the resumed delivery",
             world.delivery_worker)
    assert set(received(tmp_path / "late")) == {published.sop_instance_uid}


def test_publishing_on_postgresql(postgres_database: Database, tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path, sr_destinations=["PACS@127.0.0.1:104", "VNA@[::1]:105"])
    sink = DatabaseSink(Archive(settings.archive_dir), postgres_database)
    series = ct_series(ct_images(2, seed=28))
    for ds in series:
        assert sink.accept(ds, "MODALITY") == 0
    first_pk = record_result(postgres_database, series, label="COVID")
    queued: list[int] = []
    first = publish_result(postgres_database, settings, first_pk, enqueue=lambda pk, _: queued.append(pk))
    assert first is not None and first.created and len(first.delivery_pks) == 2 and queued == list(first.delivery_pks)
    with postgres_database.session() as session:
        rows = session.scalars(select(SrDelivery).where(SrDelivery.id.in_(first.delivery_pks))).all()
        assert {Destination.parse(row.destination) for row in rows} == set(settings.sr_destinations)  # IPv6 too
    assert not publish_result(postgres_database, settings, first_pk, enqueue=lambda pk, _: queued.append(pk)).created  # type: ignore[union-attr]
    second_pk = record_result(postgres_database, series, label="non-COVID")
    assert publish_result(postgres_database, settings, first_pk) is None
    second = publish_result(postgres_database, settings, second_pk, enqueue=lambda pk, _: queued.append(pk))
    assert second is not None and second.revision == 1 and len(queued) == 4
    check_sr_matches_result(second.archive_path, postgres_database, second_pk)
    assert read_classification_sr(pydicom.dcmread(second.archive_path)).predecessors == (first.sop_instance_uid,)
    assert publish_missing(postgres_database, settings) == 0


def test_a_correction_while_the_sr_is_built_makes_publishing_start_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(env={}, data_dir=tmp_path)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        sink = DatabaseSink(Archive(settings.archive_dir), database)
        series = mr_series(brain_images(2, seed=29))
        for ds in series:
            assert sink.accept(ds, "MODALITY") == 0
        result_pk = record_result(database, series, label="glioma")
        built: list[str] = []
        build = reporting._build

        def build_while_a_radiologist_corrects(plan: Any, predecessor: Dataset | None) -> Dataset:
            built.append(plan.label)
            if len(built) == 1:
                with database.session() as session:
                    user = User(name="radiologist", role="radiologist", password_hash="x")
                    session.add(user)
                    session.flush()
                    record_decision(session, session.get_one(Result, result_pk), user, Decision.CORRECT, "meningioma")
            return build(plan, predecessor)

        monkeypatch.setattr(reporting, "_build", build_while_a_radiologist_corrects)
        published = publish_result(database, settings, result_pk)
        assert built == ["glioma", "meningioma"]
        assert published is not None and published.revision == 0
        assert read_classification_sr(pydicom.dcmread(published.archive_path)).finding == "meningioma"
        assert list(published.archive_path.parent.iterdir()) == [published.archive_path]
    finally:
        database.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--sr-destination", "PACS@pacs.example.org"], "is not a destination of the form AE@HOST:PORT"),
        (["worker", "--queue", "delivery", "--sr-destination", "A_VERY_LONG_AE_TITLE@h:104"], "not a valid AE title"),
        (["sr", "show", "/nonexistent/sr.dcm"], "cannot read a DICOM file"),
    ],
)
def test_bad_sr_arguments_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    if args[0] != "sr":
        args += ["--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    run = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode in (1, 2) and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
