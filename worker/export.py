"""``dataset export``: archived series with radiologist-confirmed labels -> the image folders the trainer reads.

Layout: ``OUT/Training/<class>/*.png`` + ``OUT/Testing/<class>/*.png`` (every class folder exists, possibly empty),
``OUT/manifest.csv`` (one row per image: file, split, label, label source, pseudonymous patient and series, frame)
and ``OUT/export.json`` (what was exported, with which options, and the manifest's hash).

* Images are the worker's own preprocessing (:func:`worker.decoding.decode_series`: modality LUT, the models' lung
  window for CT, percentile window for MR; then :func:`worker.decoding.series_inputs`: the lungs or the head cut out
  with the training images' margins), one 8-bit grey PNG per slice the worker reads, so a model trains on what it
  will see. Slices the worker leaves out (no lung, no head) are not exported; each series counts them.
* De-identified: file names and the manifest hold only pseudonymous IDs, an HMAC-SHA256 under the configured
  ``pseudonym_key`` of the patient identity and of the series UID; PNGs carry no metadata. The mapping back to
  series stays in the database (the registry's data manifest), never in the export.
* Split by patient: all images of one patient go to the same split, so a test image never has a sibling slice
  in training. The split is stable (by the keyed hash), stratified by class, and each class with two patients or
  more has one in each split.

:func:`export_dicom_tree` writes the same layout from a labelled tree of DICOM series outside the archive (public
real scanner series, another hospital's labelled studies): the labels file of ``evaluate --dicom``, patients from
the headers' Patient ID (or the study, where it is empty), the same keyed pseudonyms and split.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select, true

from config import Settings
from models.tasks import Task
from training.data import PATIENT_MANIFEST
from worker.db import Database, Instance, Patient, Result, Series, Study
from worker.db.review import TrainingExample
from worker.decoding import decode_series, series_inputs

log = logging.getLogger(__name__)

TRAIN_FOLDER, TEST_FOLDER = "Training", "Testing"
#: The manifest doubles as the trainer's patient manifest, which keeps a patient's images in one split.
MANIFEST_FILE, SUMMARY_FILE = PATIENT_MANIFEST, "export.json"
#: The share of patients (per class) exported to ``Testing``.
TEST_FRACTION = 0.2
MANIFEST_COLUMNS = ("file", "split", "label", "label_source", "patient", "series", "frame")


class ExportError(ValueError):
    """The export cannot run (no key, output folder not empty, ...); the message says what to do."""


def check_patients_per_class(patient_labels: dict[str, str], class_names: tuple[str, ...], minimum: int) -> None:
    """Refuse a non-empty export where a class has fewer than ``minimum`` patients (an empty one trains nothing
    and is left to the caller to refuse)."""
    if not patient_labels or minimum <= 0:
        return
    counts = {name: sum(1 for label in patient_labels.values() if label == name) for name in class_names}
    short = [f"{name} has {count}" for name, count in counts.items() if count < minimum]
    if short:
        raise ExportError(f"too few patients per class to export a patient-safe training set: {', '.join(short)} "
                          f"(at least {minimum} each; setting export_min_patients_per_class). Review more studies "
                          "of those classes, or add an external labelled folder")


@dataclass(frozen=True)
class LabelledSeries:
    """A series to export and its label; ``source`` is ``radiologist`` (confirmed/corrected) or ``model``."""

    series_pk: int
    series_instance_uid: str
    patient_identity: str
    label: str
    source: str
    paths: tuple[Path, ...]


@dataclass
class ExportResult:
    out_dir: Path
    task: str
    images: int = 0
    #: ``[{"pseudo_series", "pseudo_patient", "series_instance_uid", "label", "label_source", "split", "images"}]``:
    #: the lineage kept in the database (the export folder itself holds no UID).
    series: list[dict[str, Any]] = field(default_factory=list)
    #: ``[{"pseudo_series", "reason"}]`` for series that could not be rendered.
    skipped: list[dict[str, str]] = field(default_factory=list)
    manifest_sha256: str = ""
    #: Unreviewed model results left out because only radiologists' labels were asked for (the default).
    unreviewed_left_out: int = 0

    def label_sources(self) -> dict[str, int]:
        """Images per label source: ``radiologist`` (confirmed/corrected), ``model`` (the model's own result)..."""
        out: dict[str, int] = {}
        for entry in self.series:
            out[entry["label_source"]] = out.get(entry["label_source"], 0) + entry["images"]
        return out

    def model_labels(self) -> int:
        """How many exported images carry the model's own, unreviewed label (0 unless asked for)."""
        return self.label_sources().get("model", 0)

    def patients(self) -> dict[str, dict[str, int]]:
        """Patients per split and class (a patient counts under the class the split was stratified by)."""
        seen: dict[str, dict[str, set[str]]] = {TRAIN_FOLDER: {}, TEST_FOLDER: {}}
        for entry in self.series:
            seen[entry["split"]].setdefault(entry["label"], set()).add(entry["pseudo_patient"])
        return {split: {label: len(who) for label, who in per_class.items()} for split, per_class in seen.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out: dict[str, dict[str, int]] = {TRAIN_FOLDER: {}, TEST_FOLDER: {}}
        for entry in self.series:
            split = out[entry["split"]]
            split[entry["label"]] = split.get(entry["label"], 0) + entry["images"]
        return out


class Pseudonymizer:
    """Keyed-hash pseudonyms: the same input always gives the same ID under one key, and nobody without the key
    can check a guessed patient ID against it."""

    def __init__(self, key: str) -> None:
        if len(key) < 16:
            raise ExportError("pseudonym_key must be at least 16 characters")
        self._key = key.encode()

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, identity: str) -> str:
        return "p" + self._digest("patient", identity)[:16]

    def series(self, series_instance_uid: str) -> str:
        return "s" + self._digest("series", series_instance_uid)[:16]

    def unit_interval(self, pseudonym: str) -> float:
        """A stable number in [0, 1) per pseudonym: where a patient falls for the split."""
        return int(self._digest("split", pseudonym)[:13], 16) / float(16**13)


def _patient_identity(patient: Patient, study: Study) -> str:
    # PatientID is unique only with its issuer; an empty ID says nothing, so such a study is a patient of its own.
    if not patient.patient_id.strip():
        return f"study:{study.study_instance_uid}"
    return f"id:{patient.issuer_of_patient_id}\x00{patient.patient_id}"


def _received_since(since: date | None) -> Any:
    """The condition "the series was first received on or after the UTC day ``since``" (always true without it):
    what ``--since`` means for exports, retraining and the counts they print."""
    if since is None:
        return true()
    return Series.first_received_at >= datetime(since.year, since.month, since.day, tzinfo=timezone.utc)


def _unreviewed_results(task: Task, since: date | None) -> Any:
    """The select of the task's current results on series no radiologist confirmed or corrected."""
    return (
        select(Series, Study, Patient, Result.label)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .join(Result, Result.series_pk == Series.id)
        .where(Result.task == task.name, Result.superseded_by_pk.is_(None),
               Series.id.not_in(select(TrainingExample.series_pk)), _received_since(since))
    )


def label_counts(database: Database, task: Task, since: date | None = None) -> dict[str, int]:
    """``{"reviewed": n, "unreviewed": m}``: series (first received on or after ``since``, where given) a retraining
    of ``task`` would learn from by default (reviewed by a radiologist) and series whose only label is the model's
    own result (used only when asked for). What the admin page shows before a run starts."""
    from sqlalchemy import func

    with database.read_session() as session:
        reviewed = session.scalar(select(func.count()).select_from(TrainingExample)
                                  .join(Series, TrainingExample.series_pk == Series.id)
                                  .where(TrainingExample.task == task.name, _received_since(since))) or 0
        unreviewed = session.scalar(select(func.count()).select_from(
            _unreviewed_results(task, since).where(Result.label.in_(task.class_names)).subquery())) or 0
    return {"reviewed": int(reviewed), "unreviewed": int(unreviewed)}


def labelled_series(database: Database, task: Task, confirmed_only: bool, since: date | None) -> list[LabelledSeries]:
    """The task's archived series with a label: the radiologists' (latest decision) and, unless
    ``confirmed_only``, the current model result of series nobody reviewed."""
    with database.session() as session:
        query = (
            select(Series, Study, Patient, TrainingExample.label)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
            .join(TrainingExample, TrainingExample.series_pk == Series.id)
            .where(TrainingExample.task == task.name, _received_since(since))
        )
        rows = [(s, st, p, label, "radiologist") for s, st, p, label in session.execute(query)]
        if not confirmed_only:
            rows += [(s, st, p, label, "model")
                     for s, st, p, label in session.execute(_unreviewed_results(task, since))]
        out = []
        for series, study, patient, label, source in sorted(rows, key=lambda r: r[0].id):
            if label not in task.class_names:  # an indeterminate result names no class to train on
                log.info("series %d: label %r is not a %s class; not exported", series.id, label, task.name)
                continue
            paths = session.scalars(
                select(Instance.archive_path).where(Instance.series_pk == series.id).order_by(Instance.id)
            ).all()
            out.append(LabelledSeries(series.id, series.series_instance_uid, _patient_identity(patient, study),
                                      label, source, tuple(Path(p) for p in paths)))
    return out


def assign_splits(patient_labels: dict[str, str], pseudonyms: Pseudonymizer, class_names: tuple[str, ...],
                  test_fraction: float = TEST_FRACTION) -> dict[str, str]:
    """``{pseudo patient: split}``: by the keyed hash, per class; each class with 2+ patients gets both splits."""
    splits: dict[str, str] = {}
    for class_name in class_names:
        patients = sorted((p for p, label in patient_labels.items() if label == class_name),
                          key=pseudonyms.unit_interval)
        chosen = {p: TEST_FOLDER if pseudonyms.unit_interval(p) < test_fraction else TRAIN_FOLDER for p in patients}
        if len(patients) >= 2:
            if TEST_FOLDER not in chosen.values():
                chosen[patients[0]] = TEST_FOLDER
            if TRAIN_FOLDER not in chosen.values():
                chosen[patients[-1]] = TRAIN_FOLDER
        splits.update(chosen)
    return splits


def _write_png(image: np.ndarray, path: Path) -> None:
    # Display images are float 0..255; PNG keeps 8 bits, the depth of every training image the models saw.
    grey = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(path, format="PNG")  # PIL writes no text chunks unless asked


def _pseudonymizer(settings: Settings) -> Pseudonymizer:
    if settings.pseudonym_key is None:
        raise ExportError("set pseudonym_key (DICOM_TRIAGE_PSEUDONYM_KEY or the config file) before exporting: "
                          "it keys the pseudonymous patient and series IDs")
    return Pseudonymizer(settings.pseudonym_key.get_secret_value())


def export_dataset(
    database: Database,
    settings: Settings,
    task: Task,
    out_dir: Path | str,
    *,
    confirmed_only: bool = True,
    since: date | None = None,
    min_patients_per_class: int | None = None,
) -> ExportResult:
    """Export the task's labelled archived series to ``out_dir`` (which must not exist or be empty).

    Written to a temporary sibling folder and renamed at the end, so ``out_dir`` never holds half an export.
    """
    pseudonyms = _pseudonymizer(settings)
    options = {"confirmed_only": confirmed_only, "since": since.isoformat() if since else None}
    left_out = 0 if not confirmed_only else label_counts(database, task, since)["unreviewed"]
    minimum = settings.export_min_patients_per_class if min_patients_per_class is None else min_patients_per_class
    return _export(out_dir, task, pseudonyms, lambda: labelled_series(database, task, confirmed_only, since),
                   {**options, "min_patients_per_class": minimum}, unreviewed_left_out=left_out)


def _header_patient_identity(path: Path) -> str:
    header = dcmread(path, stop_before_pixels=True,
                     specific_tags=["PatientID", "IssuerOfPatientID", "StudyInstanceUID"])
    patient_id = str(header.get("PatientID", "") or "").strip()
    if not patient_id:
        return f"study:{header.get('StudyInstanceUID', '')}"
    return f"id:{header.get('IssuerOfPatientID', '') or ''}\x00{patient_id}"


def labelled_tree_series(root: Path, labels_file: Path | None, task: Task) -> list[LabelledSeries]:
    """The series of a labelled DICOM tree (``evaluate --dicom``'s labels) whose label is a class of ``task``."""
    from worker.evaluation import EvaluationError, find_series, read_labels

    try:
        found = find_series(root, read_labels(labels_file) if labels_file else None, task)
    except EvaluationError as exc:
        raise ExportError(str(exc)) from None
    out = []
    for number, item in enumerate(found, start=1):
        if item.label not in task.class_names:
            continue  # out-of-domain series teach no class
        uid = dcmread(item.paths[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        out.append(LabelledSeries(number, str(uid), _header_patient_identity(item.paths[0]), item.label,
                                  "dataset", item.paths))
    if not out:
        raise ExportError(f"no series under {root} is labelled with a class of {task.name}")
    return out


def export_dicom_tree(settings: Settings, task: Task, root: Path | str, labels_file: Path | None,
                      out_dir: Path | str) -> ExportResult:
    """Export a labelled tree of DICOM series (not the archive) to ``out_dir``, as :func:`export_dataset` does."""
    pseudonyms = _pseudonymizer(settings)
    root = Path(root)
    options = {"dicom_tree": True, "labels": labels_file.name if labels_file else None,
               "min_patients_per_class": settings.export_min_patients_per_class}
    return _export(out_dir, task, pseudonyms, lambda: labelled_tree_series(root, labels_file, task), options)


def _export(out_dir: Path | str, task: Task, pseudonyms: Pseudonymizer,
            series_source: Callable[[], list[LabelledSeries]], options: dict[str, Any],
            unreviewed_left_out: int = 0) -> ExportResult:
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder")
    work = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        result = _export_into(work, task, pseudonyms, series_source(), options, unreviewed_left_out)
        if out_dir.exists():
            out_dir.rmdir()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.out_dir = out_dir
    return result


def _export_into(work: Path, task: Task, pseudonyms: Pseudonymizer, series_list: list[LabelledSeries],
                 options: dict[str, Any], unreviewed_left_out: int = 0) -> ExportResult:
    for split in (TRAIN_FOLDER, TEST_FOLDER):
        for class_name in task.class_names:
            (work / split / class_name).mkdir(parents=True, exist_ok=True)
    # A patient's split follows the label most of their series carry (ties: the first in class order).
    votes: dict[str, list[str]] = defaultdict(list)
    for item in series_list:
        votes[pseudonyms.patient(item.patient_identity)].append(item.label)
    patient_labels = {
        patient: max(task.class_names, key=lambda c: (labels.count(c), -task.class_names.index(c)))
        for patient, labels in votes.items()
    }
    # Refused before a single file is written: the message says which class is short, and by how much.
    check_patients_per_class(patient_labels, task.class_names, int(options.get("min_patients_per_class", 0)))
    splits = assign_splits(patient_labels, pseudonyms, task.class_names)
    result = ExportResult(out_dir=work, task=task.name, unreviewed_left_out=unreviewed_left_out)
    rows: list[dict[str, Any]] = []
    for item in series_list:
        patient, series_id = pseudonyms.patient(item.patient_identity), pseudonyms.series(item.series_instance_uid)
        split = splits[patient]
        try:
            frames = decode_series(item.paths, task)
        except Exception as exc:  # pydicom and the decoders raise many types; the series is skipped and listed
            result.skipped.append({"pseudo_series": series_id, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        regions, inputs = series_inputs(frames, task)
        written = 0
        for number, (region, image) in enumerate(zip(regions, inputs), start=1):
            if not region.suitable:
                continue  # the worker leaves this slice out of the series' result too
            name = f"{patient}_{series_id}_{number:04d}.png"
            _write_png(image, work / split / item.label / name)
            rows.append({"file": f"{split}/{item.label}/{name}", "split": split, "label": item.label,
                         "label_source": item.source, "patient": patient, "series": series_id, "frame": number})
            written += 1
        result.series.append({
            "pseudo_series": series_id, "pseudo_patient": patient, "series_instance_uid": item.series_instance_uid,
            "label": item.label, "label_source": item.source, "split": split, "images": written,
            "slices_left_out": len(frames) - written,
        })
        result.images += written
    with (work / MANIFEST_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    result.manifest_sha256 = hashlib.sha256((work / MANIFEST_FILE).read_bytes()).hexdigest()
    summary = {
        "task": task.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {**options, "test_fraction": TEST_FRACTION},
        "images": result.images,
        "series": len(result.series),
        "counts": result.counts(),
        # Class balance by patients, not only images: one patient's many slices weigh as one patient.
        "patients": result.patients(),
        # Images per label source; "model" images carry the model's own unreviewed result as their label.
        "label_sources": result.label_sources(),
        "model_labels": result.model_labels(),
        "unreviewed_left_out": result.unreviewed_left_out,
        "skipped": result.skipped,
        "manifest_sha256": result.manifest_sha256,
    }
    (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


__all__ = ["ExportError", "ExportResult", "Pseudonymizer", "assign_splits", "check_patients_per_class",
           "export_dataset", "export_dicom_tree", "label_counts", "labelled_series", "labelled_tree_series"]
