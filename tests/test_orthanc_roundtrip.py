"""Round trip with a real PACS: Orthanc sends a study to ``dicom-triage serve``, which classifies it and sends its SR
back to Orthanc (into the same study) and to dcmtk's storescp, the second destination, which is down at first.

Orthanc and storescp listen on every interface, so the whole scenario runs in a fresh network namespace
(``unshare -n``, loopback only): Orthanc, storescp, ``serve`` and the HTTP calls (curl) all enter it with
``nsenter``. The test process reads the SQLite database and the archive from the shared file system.
The models are the tiny threshold classifiers of test_e2e_pipeline.py (fitted at test time, CPU only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from dicom_factory import brain_images, write_files
from dicom_io.synthesis import mr_series
from processes import Child, NetworkNamespace, serve_ready, triage_command, triage_environment, wait_for
from test_sr_delivery import RETRY_SETTINGS, associations, check_sr_matches_result, received, start_storescp
from worker.db import Database, Result, Series
from worker.report import results_report

ORTHANC = "/usr/sbin/Orthanc"
OUR_AE, OUR_PORT = "DICOM_TRIAGE", 11112
ORTHANC_AE, ORTHANC_DICOM, ORTHANC_HTTP = "ORTHANC", 4242, 8042
STORESCP_AE, STORESCP_PORT = "STORESCP", 11115
STARTUP_SECONDS = 180  # TensorFlow's import is slow on a loaded 2-core CI machine


@contextmanager
def orthanc_world(tmp_path: Path, **config: Any) -> Iterator[tuple[NetworkNamespace, "Orthanc", list[Child]]]:
    """A loopback-only network namespace with Orthanc running in it (``config`` added to its configuration); the
    processes a test adds to the list are stopped with Orthanc, and the namespace closed, when the test ends."""
    netns = NetworkNamespace()
    started: list[Child] = []
    try:
        orthanc = Orthanc(netns, tmp_path / "orthanc", **config)
        started.append(orthanc.process)
        yield netns, orthanc, started
    finally:
        for process in started:
            process.stop()
        netns.close()


class Orthanc:
    """Orthanc in the namespace, storage in a temporary folder, our listener as modality ``triage``."""

    def __init__(self, netns: NetworkNamespace, directory: Path, **extra: Any) -> None:
        self.netns = netns
        config = {
            "Name": "dicom-triage-test",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"),
            "HttpPort": ORTHANC_HTTP,
            "DicomPort": ORTHANC_DICOM,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"triage": [OUR_AE, "127.0.0.1", OUR_PORT]},
            "DicomScuTimeout": 30,
            "Plugins": [],
            **extra,
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "orthanc.json").write_text(json.dumps(config))
        self.process = Child([ORTHANC, str(directory / "orthanc.json")], netns=netns)
        wait_for(lambda: self.netns.run(["curl", "-sf", self.url("/system")]).returncode == 0, 30, "Orthanc",
                 self.process)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{ORTHANC_HTTP}{path}"

    def get(self, path: str) -> Any:
        run = self.netns.run(["curl", "-sf", self.url(path)])
        assert run.returncode == 0, (path, run.stderr)
        return json.loads(run.stdout)

    def post(self, path: str, *data: str) -> Any:
        run = self.netns.run(["curl", "-sf", "-X", "POST", *data, self.url(path)])
        assert run.returncode == 0, (path, run.stderr, self.process.output[-3000:])
        return json.loads(run.stdout)

    def download(self, path: str, target: Path) -> Path:
        run = self.netns.run(["curl", "-sf", "-o", str(target), self.url(path)])
        assert run.returncode == 0, (path, run.stderr)
        return target


def test_orthanc_sends_a_study_and_gets_our_sr_back_in_the_same_study(
    models_dir: Path, tmp_path: Path
) -> None:
    with orthanc_world(tmp_path) as (netns, orthanc, started):
        data_dir = tmp_path / "data"
        # storescp stays down until Orthanc has the SR: with a short backoff it must still be pending by then.
        env = triage_environment(models_dir, **{**RETRY_SETTINGS, "sr_delivery_max_attempts": 30})
        serve = Child(triage_command(
            "serve", "--data-dir", str(data_dir), "--dicom-port", str(OUR_PORT),
            "--ae-title", OUR_AE, "--web-port", "8081",
            "--sr-destination", f"{ORTHANC_AE}@127.0.0.1:{ORTHANC_DICOM}",
            "--sr-destination", f"{STORESCP_AE}@127.0.0.1:{STORESCP_PORT}",
        ), env, name="serve", netns=netns)
        started.append(serve)
        serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")

        # The PACS gets a study over REST, then sends it to us by C-STORE.
        series = mr_series(brain_images(3, seed=31), patient_name="Roundtrip^Orthanc")
        for path in write_files(series, tmp_path / "upload"):
            uploaded = orthanc.post("/instances", "--data-binary", f"@{path}")
        study_id = uploaded["ParentStudy"]
        orthanc.post("/modalities/triage/store", "-d", study_id)

        # Classified while the second destination is down; the SR reaches Orthanc all the same.
        database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
        try:
            def delivered_to_orthanc() -> dict[str, Any] | None:
                entries = results_report(database)["series"]
                sr = entries[0]["sr"] if entries else None
                statuses = {d["destination"].split("@")[0]: d for d in sr["deliveries"]} if sr else {}
                sent = statuses.get(ORTHANC_AE, {}).get("status") == "sent"
                return sr if sent and statuses[STORESCP_AE]["error"] else None

            sr = wait_for(delivered_to_orthanc, 120, "the SR at Orthanc and a failed attempt at storescp", serve)
            (entry,) = results_report(database)["series"]
            assert entry["status"] == "done" and entry["series_instance_uid"] == series[0].SeriesInstanceUID
            down = {d["destination"].split("@")[0]: d for d in sr["deliveries"]}[STORESCP_AE]
            assert down["status"] == "pending" and down["attempts"] >= 1 and "no association" in down["error"]
            with database.session() as session:
                result_pk = session.scalars(
                    select(Result.id).join(Series, Result.series_pk == Series.id)
                    .where(Series.series_instance_uid == series[0].SeriesInstanceUID)
                ).one()
            archived = Path(sr["archive_path"])
            check_sr_matches_result(archived, database, result_pk)

            # Orthanc filed our SR into the same study, as a series of its own.
            sr_series = [s for s in orthanc.get(f"/studies/{study_id}/series")
                         if s["MainDicomTags"].get("Modality") == "SR"]
            assert len(sr_series) == 1, sr_series
            (instance_id,) = sr_series[0]["Instances"]
            copy = pydicom.dcmread(orthanc.download(f"/instances/{instance_id}/file", tmp_path / "from-orthanc.dcm"))
            assert copy.SOPInstanceUID == sr["sop_instance_uid"]
            assert copy.StudyInstanceUID == series[0].StudyInstanceUID
            assert copy == pydicom.dcmread(archived)

            # The second destination comes up and gets the same SR.
            storescp = start_storescp(netns, STORESCP_PORT, tmp_path / "storescp", ae_title=STORESCP_AE)
            started.append(storescp)
            wait_for(lambda: all(d["status"] == "sent" for d in results_report(database)["series"][0]["sr"]
                                 ["deliveries"]), 60, "the SR at storescp", serve)
            assert set(received(tmp_path / "storescp")) == {sr["sop_instance_uid"]}
            assert associations(storescp) == 1
        finally:
            database.dispose()
        serve.popen.terminate()
        assert serve.popen.wait(timeout=90) == 0, serve.output[-3000:]

