"""DICOMweb with a real peer (issue 19): Orthanc with Debian's DICOMweb plugin is a backfill source (QIDO-RS plan,
WADO-RS retrieval into ``serve``, which classifies what arrives) and a client of our QIDO-RS/WADO-RS, which serve
our SRs and nothing else; a source whose responses break mid-retrieve (a proxy in front of Orthanc cuts them) is
resumed where it stopped, or fails the study with the reason once its attempts are spent.

Everything listens inside a fresh network namespace (``unshare -n``), as in test_orthanc_roundtrip.py; the HTTP calls
to ``serve`` are made with curl inside it.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_factory import brain_images, write_files
from dicom_io.synthesis import mr_series
from processes import (Child, NetworkNamespace, free_port, serve_ready, triage_command, triage_environment,
                       wait_for)
from test_orthanc_roundtrip import ORTHANC_HTTP, OUR_PORT, STARTUP_SECONDS, Orthanc, orthanc_world
from worker.db import Database, Instance, Series, SrDocument

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
WEB_PORT, PROXY_PORT = 8081, 8043
OUR_DICOMWEB = f"http://127.0.0.1:{WEB_PORT}/dicomweb"
ORTHANC_DICOMWEB = f"http://127.0.0.1:{ORTHANC_HTTP}/dicom-web"
DICOMWEB_CONFIG = {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}

pytestmark = pytest.mark.skipif(not PLUGIN.exists(), reason="Debian's orthanc-dicomweb is not installed")


def _load(orthanc: Orthanc, tmp_path: Path, studies: dict[str, tuple[str, datetime.datetime, int]]) -> dict[str, Any]:
    """Upload each study (one MR series) to Orthanc over REST; {name: the series' datasets}."""
    loaded = {}
    for index, (name, (description, when, count)) in enumerate(studies.items()):
        series = mr_series(brain_images(count, seed=60 + index), study_description=description, when=when,
                           patient_id=f"DW-{index}", accession_number=f"DW{index}")
        for path in write_files(series, tmp_path / "upload" / name):
            orthanc.post("/instances", "--data-binary", f"@{path}")
        loaded[name] = series
    return loaded


def _cli(netns: NetworkNamespace, env: dict[str, str], *args: str) -> str:
    run = netns.run(triage_command(*args), env=env)
    assert run.returncode == 0, (args, run.stdout, run.stderr)
    return run.stdout


def _status(netns: NetworkNamespace, env: dict[str, str], data_dir: Path) -> dict[str, Any]:
    (plan,) = json.loads(_cli(netns, env, "backfill", "status", "1", "--json", "--data-dir", str(data_dir)))
    return plan


def _serve(netns: NetworkNamespace, env: dict[str, str], data_dir: Path, started: list[Child]) -> Child:
    serve = Child(triage_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(OUR_PORT),
                                 "--web-port", str(WEB_PORT)), env, name="serve", netns=netns)
    started.append(serve)
    serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")
    return serve


def _run_to_done(netns: NetworkNamespace, env: dict[str, str], data_dir: Path, serve: Child) -> dict[str, Any]:
    _cli(netns, env, "backfill", "run", "1", "--per-minute", "600", "--max-in-flight", "4",
         "--data-dir", str(data_dir))
    return wait_for(lambda: (plan := _status(netns, env, data_dir))["state"] == "done" and plan, 120,
                    "the plan done", serve, alive=True)


def _first(item: dict[str, Any], tag: str) -> str:
    """An attribute's first value from DICOM JSON (Orthanc's QIDO-RS proxy gives a single value as a plain string)."""
    assert "Value" in item.get(tag, {}), (tag, item)
    value = item[tag]["Value"]
    return str(value if isinstance(value, str) else value[0])


def _curl(netns: NetworkNamespace, path: str, *options: str) -> tuple[int, bytes]:
    """GET ``path`` of our DICOMweb service: (HTTP status, body)."""
    run = subprocess.run(netns.command(["curl", "-s", "-w", "\n%{http_code}", *options, OUR_DICOMWEB + path]),
                         capture_output=True, timeout=60)
    body, _, code = run.stdout.rpartition(b"\n")
    return int(code), body



def _instances_per_series(data_dir: Path) -> dict[str, int]:
    """Series Instance UID -> instances recorded in the database of ``serve --data-dir data_dir``."""
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        with database.session() as session:
            return dict(session.execute(select(Series.series_instance_uid, func.count(Instance.id))
                                        .join(Instance, Instance.series_pk == Series.id)
                                        .group_by(Series.series_instance_uid)).all())
    finally:
        database.dispose()

def test_backfill_from_orthanc_dicomweb_and_orthanc_pulls_our_sr(models_dir: Path, tmp_path: Path) -> None:
    with orthanc_world(tmp_path, **DICOMWEB_CONFIG) as (netns, orthanc, started):
        loaded = _load(orthanc, tmp_path, {
            "brain-a": ("MRI BRAIN WITH CONTRAST", datetime.datetime(2024, 2, 1, 9, 0), 3),
            "brain-b": ("MRI BRAIN", datetime.datetime(2024, 9, 1, 9, 0), 2),
            "brain-2023": ("MRI BRAIN", datetime.datetime(2023, 6, 1, 9, 0), 2),
            "knee-2024": ("MRI KNEE", datetime.datetime(2024, 6, 2, 9, 0), 2),
        })
        data_dir = tmp_path / "data"
        env = triage_environment(models_dir)
        token = _cli(netns, env, "tokens", "add", "orthanc", "--data-dir", str(data_dir)).strip().splitlines()[-1]

        out = _cli(netns, env, "backfill", "plan", "--from-dicomweb", ORTHANC_DICOMWEB, "--modality", "MR",
                   "--study-date", "20240101-20241231", "--description", "*BRAIN*", "--data-dir", str(data_dir))
        assert out.startswith("plan 1: 2 studies, 2 series"), out
        serve = _serve(netns, env, data_dir, started)
        plan = _run_to_done(netns, env, data_dir, serve)
        assert plan["studies"]["classified"] == 2 and plan["failures"] == [], plan

        arrived = _instances_per_series(data_dir)
        database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
        try:
            with database.session() as session:
                callers = set(session.scalars(select(Instance.calling_ae)))
                sr_paths = [Path(path) for path in session.scalars(select(SrDocument.archive_path))]
        finally:
            database.dispose()
        expected = {str(s[0].SeriesInstanceUID): len(s) for name, s in loaded.items() if name.startswith("brain-")
                    and name != "brain-2023"}
        assert arrived == expected and callers == {"DICOMWEB"}
        assert len(sr_paths) == 2
        ours = [pydicom.dcmread(path) for path in sr_paths]
        study_a = str(loaded["brain-a"][0].StudyInstanceUID)
        (sr_a,) = [sr for sr in ours if sr.StudyInstanceUID == study_a]

        # Orthanc, a DICOMweb client of ours with the token: QIDO-RS finds our SRs, WADO-RS brings one home.
        server = {"Url": OUR_DICOMWEB, "HttpHeaders": {"Authorization": f"Bearer {token}"}}
        run = netns.run(["curl", "-sf", "-X", "PUT", "-d", json.dumps(server),
                         orthanc.url("/dicom-web/servers/triage")])
        assert run.returncode == 0, (run.stderr, orthanc.process.output[-2000:])
        studies = orthanc.post("/dicom-web/servers/triage/qido", "-d", json.dumps({"Uri": "/studies"}))
        assert sorted(_first(s, "0020000D") for s in studies) == sorted(str(sr.StudyInstanceUID) for sr in ours)
        # (Orthanc 1.10's proxy drops IS values sent as JSON numbers, as PS3.18 has them: counts are checked below.)
        assert all(_first(s, "00080061") == "SR" for s in studies), studies
        series = orthanc.post("/dicom-web/servers/triage/qido", "-d", json.dumps(
            {"Uri": f"/studies/{study_a}/series", "Arguments": {"Modality": "SR"}}))
        assert [_first(s, "0020000E") for s in series] == [str(sr_a.SeriesInstanceUID)]
        assert orthanc.post("/dicom-web/servers/triage/qido", "-d", json.dumps(
            {"Uri": "/studies", "Arguments": {"PatientID": "DW-9"}})) in ([], None)

        before = set(orthanc.get("/instances"))
        orthanc.post("/dicom-web/servers/triage/retrieve", "-d", json.dumps({"Resources": [{"Study": study_a}]}))
        (new,) = set(orthanc.get("/instances")) - before
        pulled = orthanc.download(f"/instances/{new}/file", tmp_path / "pulled.dcm")
        assert pulled.read_bytes() == Path(sr_a.filename).read_bytes()  # the very report we archived

        # Our endpoints by hand: paging, metadata, and nothing but our SRs.
        auth = ("-H", f"Authorization: Bearer {token}")
        code, body = _curl(netns, "/studies?limit=1&offset=1", *auth)
        assert code == 200 and len(json.loads(body)) == 1
        code, body = _curl(netns, "/studies?PatientID=DW-0&StudyDate=20240101-20240301", *auth)
        # The access log line keeps the query's keys only.
        serve.wait_for_line(lambda line: "/dicomweb/studies?PatientID=<redacted>&StudyDate=<redacted>" in line, 30)
        assert "DW-0" not in serve.output
        ((found),) = json.loads(body)
        assert found["0020000D"]["Value"] == [study_a] and found["00201208"]["Value"] == [1], found
        code, body = _curl(netns, f"/studies/{study_a}/metadata", *auth)
        assert code == 200 and [m["00080018"]["Value"][0] for m in json.loads(body)] == [str(sr_a.SOPInstanceUID)]
        image = loaded["brain-a"][0]
        for path in (f"/studies/{study_a}/series/{image.SeriesInstanceUID}",
                     f"/studies/{study_a}/series/{image.SeriesInstanceUID}/instances/{image.SOPInstanceUID}",
                     f"/studies/{loaded['knee-2024'][0].StudyInstanceUID}", "/studies/1.2.3.4.5.6/metadata"):
            code, body = _curl(netns, path, *auth)
            assert code == 404, (path, code, body)
        code, body = _curl(netns, f"/studies/{study_a}/series", *auth)
        assert [s["00080060"]["Value"] for s in json.loads(body)] == [["SR"]]
        code, body = _curl(netns, "/studies?PatientWeight=70", *auth)
        assert code == 400 and b"PatientWeight" in body
        code, _ = _curl(netns, f"/studies/{study_a}", *auth, "-H", "Accept: application/pdf")
        assert code == 406
        for options in ((), ("-H", "Authorization: Bearer not-a-token")):
            for path in ("/studies", f"/studies/{study_a}"):
                code, _ = _curl(netns, path, *options)
                assert code == 401, (path, options)
        assert serve.terminate() == 0


def test_a_source_breaking_mid_retrieve_is_resumed_or_fails_with_its_reason(models_dir: Path,
                                                                            tmp_path: Path) -> None:
    with orthanc_world(tmp_path, **DICOMWEB_CONFIG) as (netns, orthanc, started):
        loaded = _load(orthanc, tmp_path, {
            "flaky": ("MRI BRAIN", datetime.datetime(2024, 3, 1, 9, 0), 3),
            "broken": ("MRI BRAIN", datetime.datetime(2024, 4, 1, 9, 0), 2),
        })
        flaky, broken = (str(loaded[name][0].SeriesInstanceUID) for name in ("flaky", "broken"))
        proxy = Child([sys.executable, str(Path(__file__).with_name("faulty_http_proxy.py")), str(PROXY_PORT),
                       ORTHANC_DICOMWEB, flaky, "--always", broken], name="proxy", netns=netns)
        started.append(proxy)
        proxy.wait_for_line(lambda line: "listening" in line, 30)
        data_dir = tmp_path / "data"
        env = triage_environment(models_dir)
        out = _cli(netns, env, "backfill", "plan", "--from-dicomweb", f"http://127.0.0.1:{PROXY_PORT}",
                   "--modality", "MR", "--study-date", "20240101-20241231", "--data-dir", str(data_dir))
        assert out.startswith("plan 1: 2 studies, 2 series"), out
        serve = _serve(netns, env, data_dir, started)
        plan = _run_to_done(netns, env, data_dir, serve)

        # The flaky series was cut after its first instance, then resumed: only the two missing were asked for.
        assert plan["studies"]["classified"] == 1 and plan["studies"]["failed"] == 1, plan
        (failure,) = plan["failures"]
        assert failure["study_instance_uid"] == str(loaded["broken"][0].StudyInstanceUID)
        assert failure["reason"].startswith(f"http://127.0.0.1:{PROXY_PORT}: WADO-RS of ")
        assert "attempt 3 of 3" in failure["reason"] and "Connection broken" in failure["reason"], failure
        requests = [line.split()[1] for line in proxy.lines if line.startswith("GET ") and "multipart" in line]
        flaky_uids = [str(ds.SOPInstanceUID) for ds in loaded["flaky"]]
        asked = [path.rsplit("/", 1)[-1] for path in requests if flaky in path and "/instances/" in path]
        assert sum(path.endswith(f"/series/{flaky}") for path in requests) == 1, requests
        assert len(asked) == 2 and len(set(asked)) == 2 and set(asked) < set(flaky_uids), requests

        arrived = _instances_per_series(data_dir)
        # Nothing stored is lost: the broken series keeps the instance that arrived whole before each cut.
        assert arrived == {flaky: 3, broken: 1}, arrived
        assert serve.terminate() == 0


def test_plan_from_a_dicomweb_source_that_is_not_there_fails_clearly_and_stores_nothing(
    models_dir: Path, tmp_path: Path
) -> None:
    env = triage_environment(models_dir)
    data = ["--data-dir", str(tmp_path / "data")]
    query = ["--modality", "MR", "--study-date", "20240101-20241231", *data]
    down = subprocess.run(triage_command("backfill", "plan", "--from-dicomweb",
                                         f"http://127.0.0.1:{free_port()}/dicom-web", *query),
                          env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1 and "QIDO-RS studies: ConnectionError" in down.stderr, down.stderr
    not_url = subprocess.run(triage_command("backfill", "plan", "--from-dicomweb", "pacs.example:8042", *query),
                             env=env, capture_output=True, text=True, timeout=120)
    assert not_url.returncode != 0 and "is not an http(s) URL of a DICOMweb service" in not_url.stderr, not_url.stderr
    both = subprocess.run(triage_command("backfill", "plan", "--from", "PACS@127.0.0.1:104", "--from-dicomweb",
                                         "http://127.0.0.1:1/dicom-web", *query),
                          env=env, capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr
    status = subprocess.run(triage_command("backfill", "status", *data), env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and status.stdout.strip() == "no backfill plans", status.stdout
