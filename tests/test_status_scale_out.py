"""``dicom-triage status --json`` against a scale-out deployment (issue 20): a listener and two Celery workers on the
real PostgreSQL and Redis, while dcmtk's storescu pushes a burst of series. The report lists the three processes
(each ready, with its own pid) and the queue depths: waiting series while the burst is classified, none after,
every series done.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import JPEG2000Lossless

from databases import scratch_redis
from dicom_factory import ct_images, storescu, write_files
from dicom_io.synthesis import ct_series, encode
from processes import Child, celery_ready, free_port, serve_ready, triage_command, triage_environment, wait_for
from worker.db import Database
from worker.metrics import state_snapshot

ROOT = Path(__file__).resolve().parents[1]
OUR_AE = "DICOM_TRIAGE"
REDIS_DB = 11
STARTUP_SECONDS = 180  # TensorFlow's import is slow on a loaded 2-core CI machine
# Enough series that the queue outlasts a few status runs (each starts Python, about 2.5 s): with 10, an idle
# machine's two workers classified the burst between two runs (2 of 2 tries at main efd6f23, 1 of 2 at c4ec453).
BURST_SERIES = 24
SLICES = 16
# A series is queued again (a new revision) when an instance arrives after it fell quiet. Interleaved, each series
# waits for the other 23's instances between two of its own: over a second on a loaded CI machine, where the usual
# one-second quiet time queued 32 jobs for the 24 series (CI at 81db74b, seed 1315601451; 186 with 0.1 s).
QUIET_SECONDS = 5


@pytest.fixture
def redis_url() -> Iterator[str]:
    with scratch_redis(REDIS_DB) as url:
        yield url


def status(data_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """``dicom-triage status --json``, run as a person would run it."""
    completed = subprocess.run(triage_command("status", "--json", "--data-dir", str(data_dir)), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(completed.stdout)


def snapshot(database_url: str) -> dict[str, Any]:
    database = Database(database_url)
    try:
        return state_snapshot(database)
    finally:
        database.dispose()


def test_status_lists_every_process_and_the_queues_during_a_burst(
    models_dir: Path, tmp_path: Path, processes: list[Child], postgres_url: str, redis_url: str
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    # Batches of one image, one series per task: classifying the burst takes a while, so series wait in the queue.
    env = triage_environment(models_dir, database_url=postgres_url, broker_url=redis_url, inference_batch_size=1,
                             inference_group_frames=SLICES, worker_concurrency=1,
                             series_quiet_seconds=QUIET_SECONDS)
    listen = Child(triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(port)), env,
                   name="listen")
    workers = [Child(triage_command("worker", "--data-dir", str(data_dir)), env, name=f"worker{i}") for i in (1, 2)]
    processes += [listen, *workers]
    listen.wait_for_line(serve_ready, STARTUP_SECONDS)
    for worker in workers:
        worker.wait_for_line(celery_ready, STARTUP_SECONDS)

    idle = status(data_dir, env)
    assert idle["ready"] is True, idle
    assert idle["queues"]["inference"]["depth"] == 0 and idle["live_workers"] == 2, idle

    # The burst: JPEG 2000 CT series in one storescu run, their instances interleaved so that every series falls
    # quiet, and is queued, at the same moment: more than two workers take at once.
    burst = [[encode(ds, JPEG2000Lossless) for ds in ct_series(ct_images(SLICES, seed=40 + n))]
             for n in range(BURST_SERIES)]
    files = write_files([series[i] for i in range(SLICES) for series in burst], tmp_path / "burst")
    sent = storescu(port, files, "-xv", called_ae=OUR_AE)
    assert sent.returncode == 0 and sent.statuses == [0] * len(files), sent.output[-3000:]

    # status runs (starting Python each time) until one report shows series waiting, while the burst lasts.
    reports: list[dict[str, Any]] = []

    def waiting_seen() -> bool:
        if snapshot(postgres_url)["series"].get("done") == BURST_SERIES:
            raise AssertionError(f"the burst was classified before status saw a series waiting: {reports}")
        reports.append(status(data_dir, env))
        return reports[-1]["queues"]["inference"]["depth"] >= 1

    wait_for(waiting_seen, 120, "status showing waiting series", listen, *workers, interval=0, alive=True)
    busy = reports[-1]
    assert busy["database"] == "reachable", busy
    roles = sorted(p["role"] for p in busy["processes"])
    assert roles == ["listen", "worker", "worker"], busy["processes"]
    assert {p["pid"] for p in busy["processes"]} == {child.popen.pid for child in (listen, *workers)}
    assert all(p["ready"] for p in busy["processes"]), busy["processes"]
    assert busy["live_workers"] == 2, busy
    assert busy["queues"]["inference"]["depth"] <= BURST_SERIES, busy["queues"]
    assert busy["oldest_waiting_job_seconds"] > 0, busy
    assert busy["queues"]["delivery"]["depth"] == 0, busy["queues"]  # no SR destination configured

    wait_for(lambda: snapshot(postgres_url)["series"].get("done") == BURST_SERIES, 300, "the burst classified",
             listen, *workers, alive=True)
    after = status(data_dir, env)
    assert after["queues"]["inference"]["depth"] == 0, after["queues"]
    assert {k: v for k, v in after["series"].items() if v} == {"done": BURST_SERIES}, after["series"]
    assert after["ready"] is True and len(after["processes"]) == 3, after
    for child in (listen, *workers):
        assert child.terminate() == 0, child.output[-3000:]
