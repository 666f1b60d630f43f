"""No patient data in logs (issue 18): ``serve`` in its default text log format receives, through dcmtk's storescu,
a series whose patient and study fields carry marker strings (a single-component PatientName, as scanners send, is
what made highdicom warn with the name quoted on every SR), classifies it and makes its SR; a radiologist then
logs in, opens the study and corrects it through the real web app (a second SR). No marker is in anything serve
and its children wrote, nor in a log file of the data directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import func, select

from dicom_factory import brain_images
from dicom_io.synthesis import mr_series
from models.tasks import TASKS
from processes import Child, free_port, serve_ready, triage_command, triage_environment, wait_for
from test_e2e_pipeline import OUR_AE, STARTUP_SECONDS, push
from test_web_helpers import PASSWORD
from worker.db import Database, SrDocument
from worker.web.users import add_user

#: Each marker is distinctive on its own; a single component name (no ^) is the one highdicom warned about.
MARKERS = {
    "PatientName": "PHIMARKERNAME",
    "PatientID": "PHIMARKERID31",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "PHIACC4711",
    "StudyDescription": "PHIMARKER STUDY DESCRIPTION",
    "SeriesDescription": "PHIMARKER SERIES DESCRIPTION",
}


def _series() -> list:
    datasets = mr_series(brain_images(4, seed=31), patient_id=MARKERS["PatientID"],
                         patient_name=MARKERS["PatientName"])
    for ds in datasets:
        for keyword, value in MARKERS.items():
            setattr(ds, keyword, value)
    return datasets


def _sr_count(database: Database) -> int:
    with database.read_session() as session:
        return session.scalar(select(func.count(SrDocument.id))) or 0


def test_serve_text_logs_carry_no_phi(models_dir: Path, tmp_path: Path, processes: list[Child]) -> None:
    data = tmp_path / "data"
    dicom_port, web_port = free_port(), free_port()
    env = triage_environment(models_dir, ae_title=OUR_AE)
    serve = Child(triage_command("serve", "--data-dir", str(data), "--dicom-port", str(dicom_port),
                                 "--web-port", str(web_port)), env, name="serve")
    processes.append(serve)
    serve.wait_for_line(serve_ready, STARTUP_SECONDS)
    database = Database(f"sqlite:///{data / 'triage.sqlite3'}")
    try:
        with database.session() as session:
            add_user(session, "rad", "radiologist", PASSWORD)
        push(dicom_port, _series(), tmp_path / "series")
        wait_for(lambda: _sr_count(database) >= 1, 180, "the series' SR", serve)

        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=30) as web:
            token = re.search(r'name="csrf_token" value="([^"]+)"', web.get("/login").text)
            assert token
            assert web.post("/login", data={"username": "rad", "password": PASSWORD,
                                            "csrf_token": token[1]}).status_code == 303
            me = web.get("/api/me").json()
            item = web.get("/api/worklist").json()["items"][0]
            assert web.get(f"/api/studies/{item['study_id']}").status_code == 200
            assert web.get(f"/studies/{item['study_id']}").status_code == 200
            result = item["results"][0]
            other = next(c for c in TASKS[result["task"]].class_names if c != result["label"])
            # A correction, which makes a new SR (a confirmation keeps the one made).
            decided = web.post(f"/api/results/{result['result_id']}/decision",
                               json={"decision": "correct", "label": other},
                               headers={"X-CSRF-Token": me["csrf_token"]})
            assert decided.status_code == 200, decided.text
        wait_for(lambda: _sr_count(database) >= 2, 120, "the reviewed series' SR", serve)
        assert serve.terminate() == 0
    finally:
        database.dispose()

    written = "".join(serve.lines) + "".join(p.read_text(errors="replace") for p in data.rglob("*.log"))
    # highdicom's warning about the single-component name still comes, with the name taken out.
    assert 'The string "<redacted>" is unlikely to represent the intended person name' in written
    for keyword, value in MARKERS.items():
        for fragment in {value, *value.split()} - {"STUDY", "SERIES", "DESCRIPTION"}:
            assert fragment.lower() not in written.lower(), f"{keyword} ({fragment}) in the logs"
