"""Whole-system throughput and latency: first C-STORE to last result, against the bare model, in one run.

    .venv/bin/python bench/pipeline.py [--series 20] [--slices 24] [--task brain-tumor] [--batch-size 32]
        [--concurrency 2] [--associations 2] [--listen-processes 1] [--quiet 1.0] [--model-dir DIR | --architecture triage-cnn]
        [--broker-url redis://127.0.0.1:6379/14 --database-url postgresql://...] [--json OUT]

1. Makes ``--series`` series of ``--slices`` slices (MR 12-bit for brain-tumor, CT in HU for covid-ct) from the
   images in ../shared/data and writes them to a temporary directory.
2. Bare model: the same model (``--model-dir``, default the shipped one; ``--architecture`` builds an untrained one
   of that architecture when none is shipped) runs ``predict_on_batch`` on prepared batches of ``--batch-size`` in
   this process: images/s of the model alone.
3. Whole system: starts ``dicom-triage serve`` (listener, scheduler, Celery worker) on loopback, pushes every series
   with ``--associations`` parallel dcmtk ``storescu`` processes (TCP_NODELAY on), and waits for every result.
   Images/s = slices / (last job finished - first C-STORE sent). Latency per series = job finished - the series'
   last instance received - ``--quiet`` (the completion wait is a setting, not work), reported as p50 and p95.
   Where the latency goes, from the job rows (medians): waiting to be scheduled beyond the quiet time, on the
   queue, and classifying. Then it waits for every result's SR (made after the burst, see ``worker.tasks.SrQueue``)
   and reports when the last one was made.

Prints both side by side and their ratio (issue 3's target: whole system >= 0.7x the bare model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
STORESCU = "/usr/bin/storescu"
OUR_AE = "DICOM_TRIAGE"


def make_series(task: str, count: int, slices: int, directory: Path) -> list[list[Path]]:
    from dicom_io.synthesis import ct_series, mr_series

    pattern = "brain-tumor-mri/Testing/*/*.jpg" if task == "brain-tumor" else "covid-ct/*/*.png"
    images = sorted(SHARED_DATA.glob(pattern))
    if len(images) < slices:
        raise SystemExit(f"fewer than {slices} images match {pattern} under {SHARED_DATA}")
    rng = random.Random(7)
    make = mr_series if task == "brain-tumor" else ct_series
    result = []
    for index in range(count):
        folder = directory / f"series{index:04d}"
        folder.mkdir(parents=True)
        paths = []
        for ds in make(rng.sample(images, slices)):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        result.append(paths)
    return result


def prepare_models_dir(args: argparse.Namespace, directory: Path) -> Path:
    """A models directory holding ``<task>/``: the given or shipped model, or an untrained ``--architecture``."""
    from models.inference import default_model_dir

    source = args.model_dir or default_model_dir(args.task)
    target = directory / args.task
    directory.mkdir(parents=True, exist_ok=True)
    if (source / "model.keras").is_file():
        target.symlink_to(source.resolve(), target_is_directory=True)
        return directory
    from models.architectures import build_model, default_input_spec
    from models.card import ModelCard
    from models.tasks import get_task

    task = get_task(args.task)
    spec = default_input_spec(args.architecture, task)
    target.mkdir(parents=True)
    build_model(args.architecture, task, spec).save(target / "model.keras")
    ModelCard(task=task.name, class_names=list(task.class_names), architecture=args.architecture,
              input_spec=spec, name=f"untrained-{args.architecture}").save(target)
    print(f"no model at {source}: benchmarking an untrained {args.architecture}", flush=True)
    return directory


def bare_model(models_dir: Path, task: str, batch_size: int, seconds: float, sample: list[Path]) -> float:
    """Images/s of ``predict_on_batch`` alone on prepared batches (after a warm-up)."""
    from pydicom import dcmread

    from dicom_io.imaging import display_frames
    from models.inference import Classifier
    from models.preprocessing import prepare_batch

    classifier = Classifier.load(models_dir / task)
    images = [frame for path in sample for frame in display_frames(dcmread(path))]
    while len(images) < batch_size:
        images += images
    batch = prepare_batch(images[:batch_size], classifier.card.input_spec)
    for _ in range(3):
        classifier.predict_prepared(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.predict_prepared(batch)
        count += batch_size
    return count / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def whole_system(args: argparse.Namespace, models_dir: Path, series: list[list[Path]], work: Path) -> dict[str, Any]:
    from sqlalchemy import select

    from worker.db import Database, Job, JobState, SrDocument

    data_dir, port = work / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(
        DICOM_TRIAGE_MODELS_DIR=str(models_dir),
        DICOM_TRIAGE_SERIES_QUIET_SECONDS=str(args.quiet),
        DICOM_TRIAGE_DICOM_HOST="127.0.0.1",
        DICOM_TRIAGE_MIN_FREE_DISK_MB="0",
        DICOM_TRIAGE_INFERENCE_BATCH_SIZE=str(args.batch_size),
        DICOM_TRIAGE_WORKER_CONCURRENCY=str(args.concurrency),
        DICOM_TRIAGE_LISTEN_PROCESSES=str(args.listen_processes),
    )
    if args.broker_url:
        env["DICOM_TRIAGE_BROKER_URL"] = args.broker_url
    if args.database_url:
        env["DICOM_TRIAGE_DATABASE_URL"] = args.database_url
    database_url = args.database_url or f"sqlite:///{data_dir / 'triage.sqlite3'}"
    log = (work / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(data_dir), "--dicom-port", str(port),
         "--web-port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("dicom-triage ready:"):
                break
        else:
            raise SystemExit(f"serve exited with {serve.wait()}; see {work / 'serve.log'}")
        groups = [[p for s in series[i::args.associations] for p in s] for i in range(args.associations)]
        started_wall = time.time()
        senders = [
            subprocess.Popen([STORESCU, "-aec", OUR_AE, "127.0.0.1", str(port), *map(str, group)],
                             env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for group in groups if group
        ]
        for sender in senders:
            _, errors = sender.communicate()
            if sender.returncode != 0:
                raise SystemExit(f"storescu failed: {errors[-2000:]}")
        sent_wall = time.time()
        database = Database(database_url)
        final = (JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE)
        deadline = time.monotonic() + args.timeout
        while True:
            with database.session() as session:
                jobs = session.scalars(select(Job)).all()
            if len(jobs) >= len(series) and all(job.state in final for job in jobs):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"not all series classified after {args.timeout} s; see {work / 'serve.log'}")
            time.sleep(0.2)
        while True:  # the SRs come after the results
            with database.session() as session:
                documents = session.scalars(select(SrDocument.created_at)).all()
            if len(documents) >= len(jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        database.dispose()
    finally:
        serve.terminate()
        serve.wait(timeout=120)
        log.close()
    failed = [job.reason for job in jobs if job.state != JobState.DONE]
    if failed:
        raise SystemExit(f"{len(failed)} series not classified: {failed[:3]}")
    images = sum(len(s) for s in series)
    last = max(job.finished_at for job in jobs if job.finished_at).timestamp()
    latencies = sorted(
        (job.finished_at - job.series_last_received_at).total_seconds() - args.quiet
        for job in jobs if job.finished_at
    )
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def seconds(later: Any, earlier: Any) -> float:
        return (later - earlier).total_seconds()

    return {
        "images": images,
        "schedule_wait_median_seconds": median(
            [seconds(job.created_at, job.series_last_received_at) - args.quiet for job in jobs]),
        "queue_wait_median_seconds": median(
            [seconds(job.started_at, job.queued_at) for job in jobs if job.started_at and job.queued_at]),
        "run_median_seconds": median(
            [seconds(job.finished_at, job.started_at) for job in jobs if job.finished_at and job.started_at]),
        "srs": len(documents),
        "last_sr_after_last_result_seconds": (max(documents).timestamp() - last) if documents else float("nan"),
        "send_seconds": sent_wall - started_wall,
        "pipeline_seconds": last - started_wall,
        "images_per_second": images / (last - started_wall),
        "latency_p50_seconds": statistics.median(latencies),
        "latency_p95_seconds": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "attempts": sum(job.attempts for job in jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brain-tumor", choices=("brain-tumor", "covid-ct"))
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="worker threads (decode overlaps inference)")
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--listen-processes", type=int, default=1, help="listener processes sharing the port")
    parser.add_argument("--quiet", type=float, default=1.0, help="series_quiet_seconds")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--architecture", default="triage-cnn", help="untrained model when none is shipped")
    parser.add_argument("--bare-seconds", type=float, default=10.0)
    parser.add_argument("--broker-url")
    parser.add_argument("--database-url")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--work-dir", type=Path, help="keep the series, data directory and serve.log here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = args.work_dir or Path(tmp)
        models_dir = prepare_models_dir(args, work / "models")
        series = make_series(args.task, args.series, args.slices, work / "series")
        bare = bare_model(models_dir, args.task, args.batch_size, args.bare_seconds, series[0])
        system = whole_system(args, models_dir, series, work)
    ratio = system["images_per_second"] / bare
    print(f"task {args.task}: {args.series} series x {args.slices} slices, batch {args.batch_size}, "
          f"worker concurrency {args.concurrency}, {args.associations} association(s), quiet {args.quiet} s")
    print(f"{'bare model(batch)':<28} {bare:10.1f} images/s")
    print(f"{'whole system':<28} {system['images_per_second']:10.1f} images/s   ratio {ratio:.2f} (target >= 0.7)")
    print(f"{'latency last instance->result':<28} p50 {system['latency_p50_seconds']:.2f} s, "
          f"p95 {system['latency_p95_seconds']:.2f} s (quiet time excluded)")
    print(f"sending took {system['send_seconds']:.1f} s of {system['pipeline_seconds']:.1f} s")
    print(f"per job (medians): scheduled {system['schedule_wait_median_seconds']:.2f} s after the quiet time, "
          f"queued {system['queue_wait_median_seconds']:.2f} s, classified in {system['run_median_seconds']:.2f} s")
    print(f"{system['srs']} SR(s), the last made {system['last_sr_after_last_result_seconds']:.1f} s after the "
          f"last result")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "bare_images_per_second": bare, **system, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
