"""Ingest with relaxed SQLite commits (synchronous=NORMAL): an acknowledged instance whose row a power loss took
is re-recorded from its fsynced archive file when the listener next starts.

A real power loss cannot be staged here, so its effect on the database is: the last committed rows are gone
(SQLite keeps a consistent prefix of its WAL). The tests delete those rows after the listener stopped uncleanly
(in process, and a real ``dicom-triage listen`` killed with SIGKILL after storescu got its success statuses).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import delete, func, select

from dicom_factory import brain_images, ct_images, storescu, write_files
from dicom_io.archive import Archive
from dicom_io.synthesis import ct_series, mr_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment
from worker.db import Database, Instance, Series, upgrade_database
from worker.ingest import MARKER_PREFIX, DatabaseSink

AE = "DICOM_TRIAGE"


def _database(tmp_path: Path, durable_commits: bool = False) -> Database:
    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    upgrade_database(url)
    return Database(url, durable_commits=durable_commits)


def _instances(database: Database) -> set[str]:
    with database.session() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def _lose_rows(database: Database, uids: set[str]) -> None:
    """What a power loss does to the tail of a relaxed WAL: those commits never happened."""
    with database.session() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid.in_(uids)))
        session.execute(Series.__table__.update().values(pending=False))


def _markers(root: Path) -> list[Path]:
    return sorted(root.glob(f"{MARKER_PREFIX}*"))


def test_unclean_end_then_open_re_records_lost_rows(tmp_path: Path) -> None:
    database = _database(tmp_path)
    archive = Archive(tmp_path / "archive")
    sink = DatabaseSink(archive, database)
    assert sink.relaxed_commits
    assert sink.open() == 0
    assert [m.name for m in _markers(archive.root)] == [f"{MARKER_PREFIX}{os.getpid()}"]
    series: list[Dataset] = mr_series(brain_images(4, seed=3)) + ct_series(ct_images(3, seed=4))
    for ds in series:
        ds.file_meta.SourceApplicationEntityTitle = "MODALITY7"  # as the listener writes the file
        assert sink.accept(ds, "MODALITY7") == 0
    lost = {ds.SOPInstanceUID for ds in series[2:6]}  # across both series
    # No close(): the process "died". Our own pid counts as gone, like a restarted container's.
    _lose_rows(database, lost)
    assert _instances(database) == {ds.SOPInstanceUID for ds in series} - lost

    restarted = DatabaseSink(Archive(archive.root), database)
    assert restarted.open() == len(lost)
    assert _instances(database) == {ds.SOPInstanceUID for ds in series}
    with database.session() as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(lost))).all()
        assert {r.calling_ae for r in rows} == {"MODALITY7"}  # from the file's Source Application Entity Title
        assert all(Path(r.archive_path).is_file() for r in rows)
        assert set(session.scalars(select(Series.pending))) == {True}  # both series will be (re)classified
    assert len(_markers(archive.root)) == 1  # the stale marker went; the new sink's own is there
    restarted.close()
    assert _markers(archive.root) == []


def test_clean_close_needs_no_recovery_and_durable_commits_no_marker(tmp_path: Path) -> None:
    database = _database(tmp_path)
    archive = Archive(tmp_path / "archive")
    sink = DatabaseSink(archive, database)
    sink.open()
    series = mr_series(brain_images(2, seed=5))
    for ds in series:
        sink.accept(ds, "PACS")
    sink.close()
    assert _markers(archive.root) == []
    _lose_rows(database, {series[0].SOPInstanceUID})  # not a loss a clean close allows: shows no scan ran
    assert DatabaseSink(archive, database).open() == 0
    database.dispose()

    durable = _database(tmp_path, durable_commits=True)
    sink = DatabaseSink(Archive(tmp_path / "other"), durable)
    assert not sink.relaxed_commits
    sink.open()
    assert _markers(sink.archive.root) == []


def test_marker_moves_forward_and_bounds_the_scan(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import worker.ingest

    monkeypatch.setattr(worker.ingest, "DURABLE_EVERY_SECONDS", 0.0)  # a durable point after every commit
    database = _database(tmp_path)
    archive = Archive(tmp_path / "archive")
    sink = DatabaseSink(archive, database)
    sink.open()
    (marker,) = _markers(archive.root)
    old_series = mr_series(brain_images(2, seed=6))
    for ds in old_series:
        sink.accept(ds, "PACS")
    time.sleep(3)  # the marker keeps a slack of two seconds behind the last durable point
    new_series = mr_series(brain_images(2, seed=8))
    for ds in new_series:
        sink.accept(ds, "PACS")
    # Moved past the first series' last file: a recovery scans only the series written since.
    first_series_written = archive.path_for(
        old_series[0].StudyInstanceUID, old_series[0].SeriesInstanceUID, old_series[0].SOPInstanceUID
    ).parent.stat().st_mtime
    assert marker.stat().st_mtime > first_series_written
    assert list(archive.series_directories(marker.stat().st_mtime)) == [
        archive.path_for(new_series[0].StudyInstanceUID, new_series[0].SeriesInstanceUID, "1").parent
    ]


def test_listen_killed_after_acks_loses_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(tmp_path / "models")
    command = triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(port))
    listen = Child(command, env, name="listen")
    try:
        listen.wait_for_line(serve_ready, 120)
        datasets = mr_series(brain_images(6, seed=9)) + ct_series(ct_images(6, seed=10))
        sent = storescu(port, write_files(datasets, tmp_path / "send"), called_ae=AE)
        assert sent.statuses == [0] * len(datasets), sent.output[-3000:]
        listen.kill()  # SIGKILL right after the last success status: no clean close
    finally:
        listen.stop()
    archive_root = data_dir / "archive"
    assert len(_markers(archive_root)) == 1
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        everything = {ds.SOPInstanceUID for ds in datasets}
        assert _instances(database) == everything  # a killed process keeps its commits ...
        lost = {ds.SOPInstanceUID for ds in datasets[3:9]}
        _lose_rows(database, lost)  # ... a power loss may not: stage that

        listen = Child(command, env, name="listen")
        try:
            listen.wait_for_line(serve_ready, 120)
            assert _instances(database) == everything
            assert "re-recorded 6 archived instance(s)" in listen.output
            with database.session() as session:
                assert session.scalar(select(func.count()).select_from(Series).where(Series.pending)) == 2
            assert listen.terminate() == 0
        finally:
            listen.stop()
    finally:
        database.dispose()
    assert _markers(archive_root) == []  # a clean stop leaves none
