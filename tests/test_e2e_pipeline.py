"""End to end with real processes: dcmtk's storescu pushes studies (made now from ../shared/data images) to a
running ``dicom-triage`` listener, a real Celery worker process classifies them, ``dicom-triage results --json``
shows the results. Embedded (SQLite + filesystem broker) and scale-out (Redis + PostgreSQL); restarts; late
instances; bad configuration.

The models are tiny ``threshold`` classifiers fitted at test time on a few training images (fast, no GPU), saved
with their cards into a models directory: the worker loads them by the same code path as the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from sqlalchemy import select

from databases import scratch_redis
from dicom_factory import brain_images, ct_images, sample_images, storescu, write_files
from dicom_io.synthesis import ct_series, encode, mr_series
from models.card import ModelCard
from models.tasks import INDETERMINATE, get_task
from test_models_series import REAL
from processes import Child, celery_ready, free_port, serve_ready, triage_command, triage_environment, wait_for
from worker.db import Database, Job, JobState, Result, Series
from worker.report import results_report

ROOT = Path(__file__).resolve().parents[1]
OUR_AE = "DICOM_TRIAGE"
REDIS_DB = 13
STARTUP_SECONDS = 180  # TensorFlow's import is slow on a loaded 2-core CI machine


def start(args: list[str], env: dict[str, str]) -> Child:
    """``dicom-triage ARGS``, named after its command."""
    return Child(triage_command(*args), env, name=args[0])


def wait_ready(child: Child, timeout: float = STARTUP_SECONDS) -> str:
    """The ready line of ``serve``/``listen``, or Celery's for ``worker``."""
    return child.wait_for_line(celery_ready if child.name == "worker" else serve_ready, timeout)


def report(database_url: str) -> dict[str, Any]:
    """The results report, read in this process (polling through the command would start Python each time)."""
    database = Database(database_url)
    try:
        return results_report(database)
    finally:
        database.dispose()


def results(data_dir: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """``dicom-triage results --json``."""
    completed = subprocess.run(
        [sys.executable, "-m", "worker.cli", "results", "--data-dir", str(data_dir), "--json", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def by_series(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["series_instance_uid"]: entry for entry in report["series"]}


def all_final(report: dict[str, Any], uids: set[str]) -> bool:
    entries = by_series(report)
    return uids <= set(entries) and all(
        entries[u]["status"] in ("done", "failed", "not_applicable") for u in uids
    )


#: storescu's option proposing a compressed transfer syntax (it proposes only uncompressed ones by default).
PROPOSE = {JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv", RLELossless: "-xr"}


def push(port: int, datasets: list[Any], directory: Path) -> None:
    """Send with dcmtk's storescu in the datasets' own transfer syntax; every instance must succeed."""
    files = write_files(datasets, directory)
    syntax = datasets[0].file_meta.TransferSyntaxUID
    sent = storescu(port, files, *([PROPOSE[syntax]] if syntax in PROPOSE else []), called_ae=OUR_AE)
    assert sent.returncode == 0 and sent.statuses == [0] * len(files), sent.output[-3000:]


def check_classified(entry: dict[str, Any], task: str, models_dir: Path, expected: str | None = None) -> None:
    """A well-formed result of ``task``'s model in ``models_dir``, decided as the card says; with ``expected``, that
    label (the tests' threshold models are too weak to know the answer: only the shipped ones are held to it)."""
    card = ModelCard.load(models_dir / task)
    assert entry["status"] == "done", entry
    assert entry["task"] == task
    probabilities = entry["probabilities"]
    assert set(probabilities) == set(card.class_names)
    assert abs(sum(probabilities.values()) - 1.0) < 1e-3
    # The card's operating threshold on the suspicion decides finding or not; then the most probable class of that
    # side is the label (models.series.decide) ...
    negatives = set(get_task(task).negative_classes)
    suspicion = 1.0 - sum(p for name, p in probabilities.items() if name in negatives)
    finding = suspicion >= float(card.calibration.get("threshold", 0.5))
    side = [name for name in card.class_names if (name not in negatives) == finding]
    if entry["label"] == INDETERMINATE and finding:
        # ... except that a finding of a class the model cannot tell from normal anatomy on the series is
        # indeterminate (models.tasks.Task.contrast_confounded: pituitary on an axial post-contrast series) ...
        assert max(side, key=probabilities.get) in get_task(task).contrast_confounded, entry
        assert entry["result_reason"].startswith("finding not assessed: an axial post-contrast series"), entry
    elif entry["label"] == INDETERMINATE:
        # ... and a negative answer needs the organ covered: indeterminate on too few slices ...
        read = re.fullmatch(r"only (\d+) slice\(s\) read, too few to rule out a finding .*", entry["result_reason"])
        assert not finding and read and int(read.group(1)) < NEGATIVE_NEEDS_SLICES[task], entry
    elif entry["label"] == get_task(task).untyped_finding:
        # ... and a finding whose type the model cannot assess on the series keeps no type, and says why.
        assert finding and entry["result_reason"].startswith("type not assessed: "), entry
    else:
        assert entry["label"] == max(side, key=probabilities.get), entry
    assert entry["model_uid"] == card.uid
    if expected is not None:
        assert entry["label"] == expected, entry


#: Slices a series must have read for a negative answer, per task (the product's rule, docs/results.md: "no tumour"
#: is a claim about the whole brain; one chest slice shows diffuse COVID-19 pneumonia or its absence).
NEGATIVE_NEEDS_SLICES = {"brain-tumor": 10, "covid-ct": 1}

#: The shipped models, as installed.
SHIPPED_MODELS = ROOT / "models" / "weights"
#: Series with a known answer: (task, label, images, header); labelled images from ../shared/data the shipped models
#: classify right one by one (brain: Testing, COVID: the curated collection), ten per series. The MR series are the
#: synthesis' axial T1 post-contrast ("AX T1 POST") unless the header says otherwise: there a pituitary finding is
#: indeterminate (models.tasks.BRAIN_TUMOR.contrast_confounded), without a contrast agent pituitary.
KNOWN_ANSWERS = [
    ("brain-tumor", "glioma", "brain-tumor-mri/Testing/glioma/*.jpg", {}),
    ("brain-tumor", "pituitary", "brain-tumor-mri/Testing/pituitary/*.jpg", {"series_description": "AX T1"}),
    ("brain-tumor", INDETERMINATE, "brain-tumor-mri/Testing/pituitary/*.jpg", {}),
    ("brain-tumor", "notumor", "brain-tumor-mri/Testing/notumor/*.jpg", {}),
    ("covid-ct", "COVID", "covid-ct/COVID/*.png", {}),
    ("covid-ct", "non-COVID", "covid-ct/non-COVID/*.png", {}),
]


def test_shipped_models_give_each_series_its_known_answer(tmp_path: Path, processes: list[Child]) -> None:
    """A model that answers one class for everything, or a broken window or loader, fails here: each series is
    made of images of one known class, and its result must be that class."""
    data_dir, port, web_port = tmp_path / "data", free_port(), free_port()
    env = triage_environment(SHIPPED_MODELS)
    serve = start(["serve", "--data-dir", str(data_dir), "--dicom-port", str(port), "--web-port", str(web_port)], env)
    processes.append(serve)
    wait_ready(serve)
    expected: dict[str, tuple[str, str]] = {}
    for n, (task, label, pattern, header) in enumerate(KNOWN_ANSWERS):
        # Ten slices: enough for a negative answer (NEGATIVE_NEEDS_SLICES).
        images = sample_images(pattern, 10, seed=2024)
        series = mr_series(images, **header) if task == "brain-tumor" else ct_series(images, **header)
        push(port, series, tmp_path / f"known-{n}")
        expected[series[0].SeriesInstanceUID] = (task, label)
    url = f"sqlite:///{data_dir / 'triage.sqlite3'}"
    wait_for(lambda: all_final(report(url), set(expected)), STARTUP_SECONDS, "results", serve)
    entries = by_series(results(data_dir, env))
    for uid, (task, label) in expected.items():
        check_classified(entries[uid], task, SHIPPED_MODELS, expected=label)
    assert serve.terminate() == 0


def test_embedded_serve_classifies_routes_and_supersedes(
    models_dir: Path, tmp_path: Path, processes: list[Child]
) -> None:
    data_dir, port, web_port = tmp_path / "data", free_port(), free_port()
    env = triage_environment(models_dir)
    serve = start(["serve", "--data-dir", str(data_dir), "--dicom-port", str(port), "--web-port",
                     str(web_port)], env)
    processes.append(serve)
    ready = wait_ready(serve)
    assert f"DICOM {OUR_AE}@127.0.0.1:{port}, web http://127.0.0.1:{web_port}" in ready
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=10) as page:
        assert page.status == 200  # the worklist runs in serve (its own tests are in test_web_*)

    study = "1.2.826.0.1.3680043.8.498.9001"
    mr = mr_series(brain_images(4), study_instance_uid=study)
    ct = [encode(ds, JPEGLSLossless) for ds in ct_series(ct_images(3), study_instance_uid=study)]
    knee = ct_series(ct_images(2, seed=7), body_part="KNEE", study_description="CT KNEE")
    push(port, mr + knee, tmp_path / "push")
    push(port, ct, tmp_path / "push-jpeg-ls")
    uids = {mr[0].SeriesInstanceUID, ct[0].SeriesInstanceUID, knee[0].SeriesInstanceUID}
    url = f"sqlite:///{data_dir / 'triage.sqlite3'}"
    wait_for(lambda: all_final(report(url), uids), 120, "results", serve)
    entries = by_series(results(data_dir, env))
    check_classified(entries[mr[0].SeriesInstanceUID], "brain-tumor", models_dir)
    check_classified(entries[ct[0].SeriesInstanceUID], "covid-ct", models_dir)
    knee_entry = entries[knee[0].SeriesInstanceUID]
    assert knee_entry["status"] == "not_applicable" and knee_entry["label"] is None
    assert "body part KNEE not in CHEST/LUNG/THORAX" in knee_entry["reason"]
    assert results(data_dir, env)["rejected"] == []
    study_only = results(data_dir, env, "--study", study)
    assert {e["series_instance_uid"] for e in study_only["series"]} == uids - {knee[0].SeriesInstanceUID}

    # Real scanner DICOM pushed as a PACS would: a 2007 chest CT (every other slice) is classified from its lung
    # slices (the shipped model's answer on it is tested in test_real_dicom; this one is a threshold model); an
    # abdomen slice, which routing sends to the COVID model (BodyPartExamined is empty), comes back indeterminate,
    # saying why.
    chest = [dcmread(p) for p in sorted((REAL / "a" / "lung-pet-ct-dx" / "Lung_Dx-A0001-5mm").glob("*.dcm"))[::2]]
    abdomen = [dcmread(p) for p in sorted((REAL / "e" / "covid19-ny-sbu-abdomen" / "A062055").glob("*.dcm"))[:1]]
    push(port, chest + abdomen, tmp_path / "push-real")
    real = {chest[0].SeriesInstanceUID, abdomen[0].SeriesInstanceUID}
    wait_for(lambda: all_final(report(url), real), 120, "results of the real series", serve)
    entries = by_series(results(data_dir, env))
    check_classified(entries[chest[0].SeriesInstanceUID], "covid-ct", models_dir)
    refused = entries[abdomen[0].SeriesInstanceUID]
    assert refused["status"] == "done" and refused["label"] == INDETERMINATE, refused
    assert "too little lung" in refused["result_reason"]

    # A late instance re-runs the series; the new result supersedes the first.
    late = mr_series(brain_images(1, seed=99), study_instance_uid=study,
                     series_instance_uid=mr[0].SeriesInstanceUID)
    push(port, late, tmp_path / "late")
    database = Database(url)
    try:
        def revised() -> list[Result] | None:
            with database.session() as session:
                rows = session.scalars(
                    select(Result).join(Series, Result.series_pk == Series.id)
                    .where(Series.series_instance_uid == mr[0].SeriesInstanceUID).order_by(Result.revision)
                ).all()
                return list(rows) if len(rows) == 2 else None

        first, second = wait_for(revised, 60, "the re-run after a late instance", serve)
        assert first.superseded_by_pk == second.id and second.superseded_by_pk is None
        assert len(second.slice_probabilities) == 5 and len(first.slice_probabilities) == 4
    finally:
        database.dispose()

    # No worker died so far (the ready line's pid is still the worker: CI once found it gone, a worker killed by
    # kombu's filesystem broker handing it a half-written message, see test_filesystem_broker).
    assert "restarting it" not in serve.output, serve.output[-4000:]
    # serve restarts a worker that dies; the new one classifies what arrives next.
    worker_pid = int(re.search(r"worker pid (\d+)", wait_ready(serve)).group(1))
    os.kill(worker_pid, signal.SIGKILL)
    after = mr_series(brain_images(2, seed=21), study_instance_uid=study)
    push(port, after, tmp_path / "after")
    wait_for(lambda: all_final(report(url), {after[0].SeriesInstanceUID}), STARTUP_SECONDS, "the restarted worker",
             serve)
    check_classified(by_series(report(url))[after[0].SeriesInstanceUID], "brain-tumor", models_dir)
    assert "restarting it" in serve.output
    assert serve.terminate() == 0


@pytest.fixture
def redis_url() -> Iterator[str]:
    with scratch_redis(REDIS_DB) as url:
        yield url


def test_scale_out_on_redis_and_postgresql(
    models_dir: Path, tmp_path: Path, processes: list[Child], postgres_url: str, redis_url: str
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(models_dir, database_url=postgres_url, broker_url=redis_url)
    listen = start(["listen", "--data-dir", str(data_dir), "--dicom-port", str(port)], env)
    worker = start(["worker", "--data-dir", str(data_dir)], env)
    processes += [listen, worker]
    wait_ready(listen)
    wait_ready(worker)

    mr = [encode(ds, RLELossless) for ds in mr_series(brain_images(3, seed=5))]
    ct = [encode(ds, JPEG2000Lossless) for ds in ct_series(ct_images(2, seed=5))]
    push(port, mr, tmp_path / "push-rle")
    push(port, ct, tmp_path / "push-jpeg-2000")
    uids = {mr[0].SeriesInstanceUID, ct[0].SeriesInstanceUID}
    wait_for(lambda: all_final(report(postgres_url), uids), 120, "results", listen, worker)
    entries = by_series(results(data_dir, env))
    check_classified(entries[mr[0].SeriesInstanceUID], "brain-tumor", models_dir)
    check_classified(entries[ct[0].SeriesInstanceUID], "covid-ct", models_dir)
    assert not (data_dir / "triage.sqlite3").exists()  # everything went to PostgreSQL
    assert listen.terminate() == 0
    assert worker.terminate() == 0


@pytest.mark.slow  # four process starts (TensorFlow imports): about a minute
def test_pending_series_survive_killed_processes(
    models_dir: Path, tmp_path: Path, processes: list[Child]
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(models_dir, inference_batch_size="1")
    listen_args = ["listen", "--data-dir", str(data_dir), "--dicom-port", str(port)]
    listen = start(listen_args, env)
    processes.append(listen)
    wait_ready(listen)

    # 1. Series queued while no worker runs; then the listener is killed and restarted.
    a = mr_series(brain_images(2, seed=11))
    push(port, a, tmp_path / "a")
    url = f"sqlite:///{data_dir / 'triage.sqlite3'}"
    wait_for(lambda: by_series(report(url)).get(a[0].SeriesInstanceUID, {}).get("status") == "queued",
             30, "series A queued", listen)
    listen.kill()
    listen = start(listen_args, env)
    processes.append(listen)
    wait_ready(listen)

    # 2. A long series is being classified when its worker is killed.
    # JPEG 2000 and batches of one make it slow enough (seconds) to be caught mid-way.
    long_series = [encode(ds, JPEG2000Lossless) for ds in ct_series(ct_images(60, seed=12))]
    push(port, long_series, tmp_path / "long")
    database = Database(url)
    try:
        def job_state(series_uid: str) -> tuple[JobState, int] | None:
            with database.session() as session:
                row = session.execute(
                    select(Job.state, Job.attempts).join(Series, Job.series_pk == Series.id)
                    .where(Series.series_instance_uid == series_uid)
                ).first()
                return (row[0], row[1]) if row else None

        first_worker = start(["worker", "--data-dir", str(data_dir)], env)
        processes.append(first_worker)
        long_uid = long_series[0].SeriesInstanceUID
        deadline = time.monotonic() + STARTUP_SECONDS
        while job_state(long_uid) != (JobState.RUNNING, 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        first_worker.kill()
        assert job_state(long_uid) == (JobState.RUNNING, 1), "the job finished before its worker was killed"

        second_worker = start(["worker", "--data-dir", str(data_dir)], env)
        processes.append(second_worker)
        uids = {a[0].SeriesInstanceUID, long_uid}
        wait_for(lambda: all_final(report(url), uids), 180, "results", listen, second_worker)
        entries = by_series(results(data_dir, env))
        check_classified(entries[a[0].SeriesInstanceUID], "brain-tumor", models_dir)
        check_classified(entries[long_uid], "covid-ct", models_dir)
        assert job_state(long_uid) == (JobState.DONE, 2)
    finally:
        database.dispose()
    assert second_worker.terminate() == 0
    assert listen.terminate() == 0


@pytest.mark.parametrize(
    ("args", "env", "toml", "message"),
    [
        (["--dicom-port", "70000"], {}, None, "dicom_port [from command line]: Input should be less than or equal"),
        ([], {"DICOM_TRIAGE_SERIES_QUIET_SECONDS": "soon"}, None, "series_quiet_seconds [from DICOM_TRIAGE_"),
        ([], {"DICOM_TRIAGE_DATABASE_URL": "mysql://x"}, None, "is not a sqlite:// or postgresql:// URL"),
        ([], {}, '[[routing_rules]]\ntask = "knee-xray"\n', "unknown task(s) 'knee-xray'"),
        ([], {}, "ae_title = [", "is not valid TOML"),
    ],
)
def test_bad_configuration_is_a_clear_error(
    tmp_path: Path, args: list[str], env: dict[str, str], toml: str | None, message: str
) -> None:
    command = [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(tmp_path), *args]
    if toml is not None:
        (tmp_path / "config.toml").write_text(toml)
        command += ["--config", str(tmp_path / "config.toml")]
    base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    completed = subprocess.run(command, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert message in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr


def test_startup_failures_are_one_clear_line(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "worker.cli", "listen", "--data-dir", str(tmp_path), "--dicom-port", str(port)],
            cwd=ROOT, env={**base, "DICOM_TRIAGE_DICOM_HOST": "127.0.0.1"}, capture_output=True, text=True,
            timeout=60,
        )
    assert completed.returncode == 1
    assert f"cannot listen for DICOM on 127.0.0.1:{port}: Address already in use" in completed.stderr
    assert "Traceback" not in completed.stderr

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    completed = subprocess.run(
        [sys.executable, "-m", "worker.cli", "listen", "--data-dir", str(blocked / "data")],
        cwd=ROOT, env=base, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert f"cannot use data directory {blocked / 'data'}" in completed.stderr
    assert "Traceback" not in completed.stderr
