"""Backfill from a real PACS (issue 19): Orthanc, loaded over REST with several studies, is queried by
``backfill plan`` and retrieved by C-MOVE into ``serve``, which classifies what arrives; ``serve`` is killed
mid-run and the restarted one resumes without moving a received series again.

Everything runs in a fresh network namespace (``unshare -n``) as in test_orthanc_roundtrip.py.
"""

from __future__ import annotations

import datetime
import json
import signal
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_factory import brain_images, write_files
from dicom_io.synthesis import mr_series
from processes import Child, NetworkNamespace, serve_ready, triage_command, triage_environment, wait_for
from test_orthanc_roundtrip import ORTHANC_AE, ORTHANC_DICOM, OUR_AE, OUR_PORT, STARTUP_SECONDS, Orthanc, orthanc_world
from worker.db import Database, Instance, Series, SrDocument, Study
from worker.db.backfill import BackfillSeries

SOURCE = f"{ORTHANC_AE}@127.0.0.1:{ORTHANC_DICOM}"


def _load(orthanc: Orthanc, tmp_path: Path) -> dict[str, str]:
    """Five MR studies: three brain studies in 2024 (what the plan must find), a brain study from 2023 and a knee
    study from 2024 (what it must not). Returns {study UID: name}."""
    studies = {
        "brain-a": ("MRI BRAIN WITH CONTRAST", datetime.datetime(2024, 2, 1, 9, 0), 3),
        "brain-b": ("MRI BRAIN", datetime.datetime(2024, 6, 1, 9, 0), 2),
        "brain-c": ("MRI BRAIN PERFUSION", datetime.datetime(2024, 11, 1, 9, 0), 2),
        "brain-2023": ("MRI BRAIN", datetime.datetime(2023, 6, 1, 9, 0), 2),
        "knee-2024": ("MRI KNEE", datetime.datetime(2024, 6, 2, 9, 0), 2),
    }
    names = {}
    for index, (name, (description, when, count)) in enumerate(studies.items()):
        series = mr_series(brain_images(count, seed=40 + index), study_description=description, when=when,
                           patient_id=f"BF-{index}", accession_number=f"BF{index}")
        for path in write_files(series, tmp_path / "upload" / name):
            orthanc.post("/instances", "--data-binary", f"@{path}")
        names[str(series[0].StudyInstanceUID)] = name
    return names


def _cli(netns: NetworkNamespace, env: dict[str, str], *args: str) -> str:
    run = netns.run(triage_command("backfill", *args), env=env)
    assert run.returncode == 0, (args, run.stdout, run.stderr)
    return run.stdout


def _status(netns: NetworkNamespace, env: dict[str, str], data_dir: Path, plan_id: int) -> dict[str, Any]:
    (plan,) = json.loads(_cli(netns, env, "status", str(plan_id), "--json", "--data-dir", str(data_dir)))
    return plan


def test_backfill_plans_exactly_the_matching_studies_and_resumes_after_serve_is_killed(
    models_dir: Path, tmp_path: Path
) -> None:
    with orthanc_world(tmp_path) as (netns, orthanc, started):
        names = _load(orthanc, tmp_path)
        data_dir = tmp_path / "data"
        env = triage_environment(models_dir, ae_title=OUR_AE)

        out = _cli(netns, env, "plan", "--from", SOURCE, "--modality", "MR", "--study-date", "20240101-20241231",
                   "--description", "*BRAIN*", "--data-dir", str(data_dir))
        assert out.startswith("plan 1: 3 studies, 3 series, 7 instances"), out
        database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
        try:
            planned = _status(netns, env, data_dir, 1)
            assert planned["studies"]["planned"] == 3 and planned["state"] == "planned"

            def start_serve() -> Child:
                serve = Child(triage_command(
                    "serve", "--data-dir", str(data_dir), "--dicom-port", str(OUR_PORT), "--web-port", "8081",
                    "--sr-destination", SOURCE,
                ), env, name="serve", netns=netns)
                started.append(serve)
                serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")
                return serve

            serve = start_serve()
            # Ten seconds between study starts: serve is killed after the first study and before the last.
            _cli(netns, env, "run", "1", "--per-minute", "6", "--max-in-flight", "3", "--data-dir", str(data_dir))

            def first_received() -> dict[str, Any] | None:
                plan = _status(netns, env, data_dir, 1)
                done = plan["studies"]["received"] + plan["studies"]["classified"]
                return plan if done >= 1 else None

            before = wait_for(first_received, 60, "a first study received", serve, alive=True)
            serve.popen.send_signal(signal.SIGKILL)
            serve.popen.wait(timeout=30)
            assert before["studies"]["planned"] >= 1, before  # killed mid-run
            with database.session() as session:
                received_before = set(session.scalars(
                    select(BackfillSeries.series_instance_uid).where(BackfillSeries.received.is_(True))).all())
            assert received_before

            serve = start_serve()
            wait_for(lambda: _status(netns, env, data_dir, 1)["state"] == "done", 180, "the plan done", serve,
                     alive=True)
            final = _status(netns, env, data_dir, 1)
            assert final["studies"]["classified"] == 3 and final["failures"] == [], final

            with database.session() as session:
                moves = dict(session.execute(select(BackfillSeries.series_instance_uid, BackfillSeries.moves)).all())
                # Exactly the planned studies arrived, each with every instance.
                arrived = session.execute(select(Series.series_instance_uid, func.count(Instance.id))
                                          .join(Instance, Instance.series_pk == Series.id)
                                          .where(Series.modality == "MR")
                                          .group_by(Series.series_instance_uid)).all()
                arrived_studies = set(session.scalars(select(Study.study_instance_uid)))
                sr_count = session.scalar(select(func.count(SrDocument.id)))
            assert {uid: moves[uid] for uid in received_before} == {uid: 1 for uid in received_before}
            assert sorted(n for _, n in arrived) == [2, 2, 3]
            assert sorted(names[uid] for uid in arrived_studies) == ["brain-a", "brain-b", "brain-c"]
            # Backfilled results are archived as SRs but not sent to the PACS (backfill_sr_to_pacs is off).
            assert sr_count == 3
            sr_series = [s for s in orthanc.get("/series?expand") if s["MainDicomTags"].get("Modality") == "SR"]
            assert sr_series == []
        finally:
            database.dispose()
        serve.popen.terminate()
        assert serve.popen.wait(timeout=90) == 0, serve.output[-3000:]


def _point_pacs_at_a_dead_port(netns: NetworkNamespace, orthanc: Orthanc) -> None:
    """The PACS knows our AE at a port where nothing listens: every C-STORE sub-operation of its C-MOVE fails."""
    run = netns.run(["curl", "-sf", "-X", "PUT", "-d",
                     json.dumps({"AET": OUR_AE, "Host": "127.0.0.1", "Port": OUR_PORT + 7}),
                     orthanc.url("/modalities/triage")])
    assert run.returncode == 0, run.stderr


def test_a_move_the_pacs_cannot_complete_fails_the_study_with_its_reason(models_dir: Path, tmp_path: Path) -> None:
    with orthanc_world(tmp_path) as (netns, orthanc, started):
        names = _load(orthanc, tmp_path)
        _point_pacs_at_a_dead_port(netns, orthanc)
        data_dir = tmp_path / "data"
        env = triage_environment(models_dir, ae_title=OUR_AE)
        out = _cli(netns, env, "plan", "--from", SOURCE, "--modality", "MR", "--study-date", "20230101-20231231",
                   "--data-dir", str(data_dir))
        assert out.startswith("plan 1: 1 studies"), out
        serve = Child(triage_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(OUR_PORT),
                                     "--web-port", "8081"), env, name="serve", netns=netns)
        started.append(serve)
        serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")
        _cli(netns, env, "run", "1", "--data-dir", str(data_dir))
        plan = wait_for(lambda: (p := _status(netns, env, data_dir, 1))["state"] == "done" and p, 120,
                        "the plan done", serve, alive=True)
        assert plan["studies"]["failed"] == 1 and plan["studies"]["received"] == 0, plan
        (failure,) = plan["failures"]
        assert names[failure["study_instance_uid"]] == "brain-2023"
        assert failure["reason"].startswith("C-MOVE of series ") and "status 0x" in failure["reason"], failure
        assert serve.terminate() == 0


def test_backfill_retrieves_by_c_get_where_the_pacs_cannot_reach_us(models_dir: Path, tmp_path: Path) -> None:
    """``backfill_retrieve = "get"``: Orthanc knows our AE only at a dead port (a C-MOVE would fail, as above), yet
    every planned instance arrives on the C-GET's own association and is stored as a C-STORE is."""
    with orthanc_world(tmp_path) as (netns, orthanc, started):
        names = _load(orthanc, tmp_path)
        _point_pacs_at_a_dead_port(netns, orthanc)
        data_dir = tmp_path / "data"
        env = triage_environment(models_dir, ae_title=OUR_AE, backfill_retrieve="get")
        out = _cli(netns, env, "plan", "--from", SOURCE, "--modality", "MR", "--study-date", "20240101-20241231",
                   "--description", "*BRAIN*", "--data-dir", str(data_dir))
        assert out.startswith("plan 1: 3 studies, 3 series, 7 instances"), out
        # listen: the listener and the backfill runner without classification (the studies stay received).
        listen = Child(triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(OUR_PORT)), env,
                       name="listen", netns=netns)
        started.append(listen)
        listen.wait_for_line(serve_ready, STARTUP_SECONDS, "listen")
        _cli(netns, env, "run", "1", "--per-minute", "600", "--max-in-flight", "3", "--data-dir", str(data_dir))
        plan = wait_for(lambda: (p := _status(netns, env, data_dir, 1))["studies"]["received"] == 3 and p, 60,
                        "three studies received", listen, alive=True)
        assert plan["failures"] == [], plan
        database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
        try:
            with database.session() as session:
                moves = set(session.scalars(select(BackfillSeries.moves)))
                arrived = session.execute(select(Series.series_instance_uid, func.count(Instance.id))
                                          .join(Instance, Instance.series_pk == Series.id)
                                          .group_by(Series.series_instance_uid)).all()
                callers = set(session.scalars(select(Instance.calling_ae)))
                studies = set(session.scalars(select(Study.study_instance_uid)))
        finally:
            database.dispose()
        assert moves == {1}
        assert sorted(n for _, n in arrived) == [2, 2, 3]
        assert callers == {ORTHANC_AE}
        assert sorted(names[uid] for uid in studies) == ["brain-a", "brain-b", "brain-c"]
        assert listen.terminate() == 0
