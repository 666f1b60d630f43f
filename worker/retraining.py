"""Retraining as a Celery task on the ``training`` queue: export, train, register a candidate, evaluate for the gate.

A run is a :class:`worker.db.registry.TrainingRun` row. :func:`request_retraining` creates it and sends its id to
the ``training`` queue; a training worker (``dicom-triage training-worker``, on a GPU host when there is one)
runs :func:`run_retraining`, which records its phase, progress (0..1) and per-epoch history in the row as it goes:

1. export the task's confirmed series (:func:`worker.export.export_dataset`) into ``data_dir/training/run-N/data``;
2. train with ``dicom-triage train`` in a child process on the export plus the external folders (the child's
   TensorFlow memory, GPU included, is freed when it exits; its per-epoch lines are the progress);
3. register the model as a ``candidate`` with its data manifest (exported series, external sets) and lineage;
4. evaluate it and the active model on the reference set, so the gate's figures are ready for the admin.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select, update

from config import Settings
from models.card import CARD_FILE, ModelCard
from models.tasks import get_task
from training.cli import ARCHITECTURE_NAMES
from worker.db import Database, utcnow
from worker.db.registry import RunState, TrainingRun
from worker.export import ExportError, export_dataset
from worker.lifetime import preexec_die_with_parent
from worker.registry import RegistryError, active_model, active_model_dirs, reference_metrics, register_model
from worker.registry.gate import ReferenceSetError
from worker.workers import other_process_alive

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
RETRAIN_MODEL = "dicom_triage.retrain_model"
#: Progress shares of the phases: export, training (per epoch), evaluation.
_EXPORT_SHARE, _TRAIN_SHARE = 0.1, 0.8
_EPOCH_LINE = re.compile(r"^epoch (\d+): (.*?)(?: lr=\S+)?$")
#: Training's word on where a time budget now ends the run (training.fit.TimeBudget).
_PLAN_LINE = re.compile(r"^time budget of \S+ min: (?:training now ends at|stopping after) epoch (\d+)$")
#: The longest time budget an admin may give a retraining: a week.
MAX_TIME_BUDGET_MINUTES = 7 * 24 * 60


@dataclass(frozen=True)
class RetrainOptions:
    """What an admin chooses for a retraining; checked on creation, stored with the run."""

    epochs: int = 20
    architecture: str = "triage-cnn"
    input_size: str | None = None
    batch_size: int = 32
    confirmed_only: bool = True
    since: str | None = None
    #: External labelled folders; ``None``: the task's ``external_training_data`` setting.
    external: tuple[str, ...] | None = None
    seed: int = 0
    #: Start from the active model's weights (``train --init-from``) rather than from new ones: fine-tuning on the
    #: confirmed studies takes a fraction of a training from scratch, which matters on a CPU-only training host.
    start_from_active: bool = False
    #: Wall-clock minutes the training may take (``train --time-budget``): it ends at the last epoch that fits, with
    #: the schedule planned to finish there. ``None``: the active model's recipe decides (usually no limit).
    time_budget_minutes: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be 1..1000, not {self.epochs}")
        if self.time_budget_minutes is not None and not 0 < self.time_budget_minutes <= MAX_TIME_BUDGET_MINUTES:
            raise ValueError(f"time budget must be more than 0 and at most {MAX_TIME_BUDGET_MINUTES} minutes, "
                             f"not {self.time_budget_minutes}")
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"batch size must be 1..4096, not {self.batch_size}")
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURE_NAMES)}, not {self.architecture!r}")
        if self.input_size is not None and not re.fullmatch(r"\d+x\d+(x[13])?", self.input_size):
            raise ValueError(f"input size must be HxW or HxWxC, not {self.input_size!r}")
        if self.since is not None:
            date.fromisoformat(self.since)  # raises ValueError naming the bad date

    @property
    def since_date(self) -> date | None:
        """``since`` as the date the export and the label counts take."""
        return date.fromisoformat(self.since) if self.since is not None else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["external"] = list(self.external) if self.external is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrainOptions":
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if values.get("external") is not None:
            values["external"] = tuple(values["external"])
        return cls(**values)


def request_retraining(database: Database, send: Callable[[int], None], task_name: str, options: RetrainOptions,
                       requested_by: str) -> int:
    """Create a queued run and hand its id to ``send`` (see :func:`make_send`); return the run id."""
    task = get_task(task_name)
    with database.session() as session:
        run = TrainingRun(task=task.name, options=options.to_dict(), requested_by=requested_by, history={})
        session.add(run)
        session.flush()
        run_id = run.id
    try:
        send(run_id)
    except Exception as exc:  # the broker is down: the run must not sit "queued" forever
        _finish(database, run_id, RunState.FAILED, error=f"could not queue the run: {exc}")
        raise
    return run_id


def make_send(app: Celery) -> Callable[[int], None]:
    def send(run_id: int) -> None:
        app.send_task(RETRAIN_MODEL, args=[run_id], queue=TRAINING_QUEUE)

    return send


def run_dir(settings: Settings, run_id: int) -> Path:
    """Where a run keeps its export and its model (under the data directory every worker shares)."""
    return settings.data_dir / "training" / f"run-{run_id}"


def _update(database: Database, run_id: int, **values: Any) -> None:
    with database.session() as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))


def _finish(database: Database, run_id: int, state: RunState, **values: Any) -> None:
    _update(database, run_id, state=state.value, finished_at=utcnow(), **values)


def _claim(database: Database, run_id: int, worker: str) -> TrainingRun | None:
    with database.session() as session:
        run = session.get(TrainingRun, run_id, with_for_update=True)
        if run is None or run.state != RunState.QUEUED:
            return None  # unknown, or a duplicate message for a run already taken
        run.state, run.started_at, run.claimed_by, run.phase = RunState.RUNNING.value, utcnow(), worker, "exporting"
        session.flush()
        session.expunge(run)
        return run


def parse_epoch_line(line: str) -> tuple[int, dict[str, float]] | None:
    """``epoch 3: accuracy=0.5 loss=0.8 lr=1.00e-03`` (training's per-epoch log) -> (3, {...}), else ``None``."""
    match = _EPOCH_LINE.match(line.strip())
    if not match:
        return None
    values = {}
    for item in match.group(2).split():
        key, _, value = item.partition("=")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return int(match.group(1)), values


def parse_plan_line(line: str) -> int | None:
    """``time budget of 55 min: training now ends at epoch 97`` -> 97, else ``None``."""
    match = _PLAN_LINE.match(line.strip())
    return int(match.group(1)) if match else None


def train_command(task: str, data_dirs: list[Path], out_dir: Path, options: RetrainOptions,
                  init_from: Path | None = None, recipe: Path | None = None) -> list[str]:
    """The ``train`` command line of a retraining: the admin's options, the rest from ``recipe``'s card if given."""
    command = [sys.executable, "-m", "worker.cli", "train", task, "--out", str(out_dir), "--arch",
               options.architecture, "--epochs", str(options.epochs), "--batch-size", str(options.batch_size),
               "--seed", str(options.seed)]
    for folder in data_dirs:
        command += ["--data", str(folder)]
    if options.input_size:
        command += ["--input-size", options.input_size]
    if options.time_budget_minutes is not None:
        command += ["--time-budget", f"{options.time_budget_minutes:g}"]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    if recipe is not None:
        command += ["--recipe", str(recipe)]
    return command


def run_retraining(settings: Settings, database: Database, run_id: int) -> None:
    """Run one queued retraining to its end; every failure is recorded in the run, never raised."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    run = _claim(database, run_id, worker)
    if run is None:
        return
    try:
        _run(settings, database, run)
    except Exception as exc:
        log.exception("training run %d failed", run_id)
        _finish(database, run_id, RunState.FAILED, error=f"{type(exc).__name__}: {exc}", phase="failed")


def _run(settings: Settings, database: Database, run: TrainingRun) -> None:
    task, options = get_task(run.task), RetrainOptions.from_dict(run.options)
    folder = run_dir(settings, run.id)
    external = [Path(p) for p in (options.external if options.external is not None
                                  else settings.external_training_data.get(task.name, ()))]
    missing = [str(p) for p in external if not p.is_dir()]
    if missing:
        raise ExportError(f"external training folder(s) missing: {', '.join(missing)}")
    # The active model's card is the recipe (schedule, label smoothing, EMA, augmentation, precision, input size):
    # a retrained model is trained as the one it may replace, with the admin's choices over it.
    active_dir = active_model_dirs(database)(task.name)
    init_from = active_dir if options.start_from_active else None
    if options.start_from_active and init_from is None:
        raise RegistryError(f"no active {task.name} model to start from")
    # With external folders the archive's part may be small: they give every class its patients.
    exported = export_dataset(database, settings, task, folder / "data", confirmed_only=options.confirmed_only,
                              since=options.since_date,
                              min_patients_per_class=0 if external else None)
    if exported.images == 0 and not external:
        raise ExportError(f"no labelled {task.name} series to train on (confirm some results first)")
    left_out = (f", left out {exported.unreviewed_left_out} unreviewed results" if exported.unreviewed_left_out
                else "")
    model_own = f" ({exported.model_labels()} with the model's own label)" if exported.model_labels() else ""
    _update(database, run.id, progress=_EXPORT_SHARE,
            phase=f"exported {exported.images} images{model_own}{left_out}; training")
    sources = ([exported.out_dir] if exported.images else []) + external
    model_dir = folder / "model"
    history = _train(database, run.id, train_command(task.name, sources, model_dir, options, init_from, active_dir),
                     options.epochs, folder / "train.log")
    _update(database, run.id, progress=_EXPORT_SHARE + _TRAIN_SHARE, phase="registering", history=history)
    card = ModelCard.load(model_dir / CARD_FILE)
    # Where the labels came from travels with the model: its card and its registry row say how many of the
    # archive images it learned from carry the model's own, unreviewed result as their label.
    labels = {"label_sources": exported.label_sources(), "model_labels": exported.model_labels(),
              "unreviewed_left_out": exported.unreviewed_left_out, "confirmed_only": options.confirmed_only}
    card.training = {**card.training, "archive_labels": labels}
    card.save(model_dir / CARD_FILE)
    manifest = {
        "export": {"manifest_sha256": exported.manifest_sha256, "counts": exported.counts(),
                   "skipped": exported.skipped, **labels},
        "series": exported.series,
        "external": [str(p) for p in external],
        "dataset_manifest_sha256": card.dataset_manifest_sha256,
    }
    # A fine-tune's parent is the model it started from, which an admin may have replaced as active meanwhile.
    started_from = (card.training.get("init_from") or {}).get("source_uid")
    with database.session() as session:
        parent = active_model(session, task.name)
        parent_uid = started_from or (parent.model_uid if parent else None)
        register_model(session, model_dir, actor=run.requested_by, data_manifest=manifest, parent_uid=parent_uid)
    _update(database, run.id, model_uid=card.uid, phase="evaluating on the reference set")
    for uid in filter(None, (card.uid, parent_uid)):
        try:
            reference_metrics(database, settings, uid)
        except (RegistryError, ReferenceSetError, OSError, ValueError) as exc:
            log.warning("run %d: no reference evaluation of %s: %s", run.id, uid, exc)
    _finish(database, run.id, RunState.DONE, progress=1.0, phase="done")


def _train(database: Database, run_id: int, command: list[str], epochs: int, log_path: Path) -> dict[str, list[float]]:
    """Run the train command, turning its epoch lines into progress (of ``epochs``, or of the epoch a time budget
    plans to end on) and history; raise with its output's tail."""
    history: dict[str, list[float]] = {}
    tail: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log_file, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1], preexec_fn=preexec_die_with_parent(),
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            tail = (tail + [line.rstrip()])[-20:]
            planned = parse_plan_line(line)
            if planned is not None:  # a time budget moved the last epoch: progress counts towards it
                epochs = planned
                continue
            parsed = parse_epoch_line(line)
            if parsed is None:
                continue
            epoch, values = parsed
            for key, value in values.items():
                history.setdefault(key, []).append(value)
            _update(database, run_id, progress=_EXPORT_SHARE + _TRAIN_SHARE * min(epoch, epochs) / epochs,
                    phase=f"epoch {epoch}/{epochs}", history={k: list(v) for k, v in history.items()})
    if process.returncode != 0:
        raise RuntimeError(f"training exited with {process.returncode}: " + " | ".join(tail[-5:]))
    return history


def _fail_own_runs(database: Database) -> None:
    """Fail the runs this process holds (it is stopping)."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with database.session() as session:
        stopped = session.execute(
            update(TrainingRun)
            .where(TrainingRun.state == RunState.RUNNING.value, TrainingRun.claimed_by == worker)
            .values(state=RunState.FAILED.value, finished_at=utcnow(), phase="failed",
                    error="the training worker was stopped during the run; start the retraining again")
        )
        if stopped.rowcount:
            log.warning("stopping: failed %d training run(s) this worker was running", stopped.rowcount)


def fail_orphaned_runs(database: Database) -> int:
    """Fail the runs a dead training worker of this host held (its message is gone with it); return how many."""
    host = socket.gethostname()
    failed = 0
    with database.session() as session:
        for run in session.scalars(select(TrainingRun).where(TrainingRun.state == RunState.RUNNING)):
            owner_host, _, pid = run.claimed_by.rpartition(":")
            if owner_host == host and pid.isdigit() and not other_process_alive(int(pid)):
                run.state, run.finished_at, run.phase = RunState.FAILED.value, utcnow(), "failed"
                run.error = "the training worker running it stopped; start the retraining again"
                failed += 1
    return failed


def register_retraining_task(app: Celery, settings: Settings, database: Database) -> None:
    @app.task(name=RETRAIN_MODEL, acks_late=True, ignore_result=True, shared=False)
    def retrain_model(run_id: int) -> None:
        run_retraining(settings, database, run_id)


def run_training_worker(settings: Settings) -> int:
    """``dicom-triage training-worker``: a Celery worker on the ``training`` queue, one run at a time."""
    from worker.celery_app import create_celery_app, run_celery_worker
    from worker.db import upgrade_database

    database = Database(settings.effective_database_url)
    upgrade_database(database)
    orphaned = fail_orphaned_runs(database)
    if orphaned:
        log.warning("failed %d training run(s) whose worker had died", orphaned)
    from worker.health import ProcessHealth, Readiness, standard_checks

    app = create_celery_app(settings)
    register_retraining_task(app, settings, database)
    health = ProcessHealth(settings, Readiness("training", standard_checks(settings, database))).start()
    try:
        # A stop does not wait for a run (an hour's training): it fails it now, saying so, and the training child
        # ends with this process (its parent-death signal).
        return run_celery_worker(app, "training", TRAINING_QUEUE, pool="solo", concurrency=1,
                                 handback=lambda _deadline: _fail_own_runs(database))
    finally:
        health.stop()
        database.dispose()


@dataclass(frozen=True)
class RunView:
    """A run as the admin pages and the JSON API show it."""

    id: int
    task: str
    state: str
    progress: float
    phase: str
    requested_by: str
    options: dict[str, Any]
    history: dict[str, list[float]]
    error: str
    model_uid: str | None
    created_at: str
    finished_at: str | None


def load_runs(database: Database, run_id: int | None = None, limit: int = 20) -> list[RunView]:
    with database.session() as session:
        query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
        if run_id is not None:
            query = select(TrainingRun).where(TrainingRun.id == run_id)
        return [
            RunView(r.id, r.task, r.state, r.progress, r.phase, r.requested_by, r.options, r.history, r.error,
                    r.model_uid, r.created_at.isoformat(), r.finished_at.isoformat() if r.finished_at else None)
            for r in session.scalars(query)
        ]


__all__ = [
    "RETRAIN_MODEL",
    "TRAINING_QUEUE",
    "RetrainOptions",
    "RunView",
    "load_runs",
    "make_send",
    "parse_epoch_line",
    "request_retraining",
    "run_retraining",
    "run_training_worker",
]
