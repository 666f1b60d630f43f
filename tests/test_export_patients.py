"""Patient-safe training sets (issue 23): ``dataset export`` on a real migrated database and archive (seeded as
``test_export`` seeds it) keeps every patient's slices on one side of the split, even a patient with several
series of different classes, shows the class balance in images and patients, and refuses, with a clear message and
no folder left behind, an export where a class has too few patients."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from config import load_settings
from dicom_io.archive import Archive
from test_export import KEY, SLICES, seed
from worker.db import Database, upgrade_database
from worker.db.review import Decision

ROOT = Path(__file__).resolve().parents[1]
#: Nine patients, most with several series; PX-03 and PX-07 have a COVID and a non-COVID series each.
MANY = [
    (f"PX-{n:02d}", f"Patientsafe^Person{n}", "19700101", truth, "COVID", Decision.CONFIRM, count)
    for n, (truth, count) in enumerate([
        ("COVID", 3), ("COVID", 2), ("COVID", 1), ("COVID|non-COVID", 2), ("COVID", 2),
        ("non-COVID", 2), ("non-COVID", 3), ("non-COVID|COVID", 2), ("non-COVID", 1)])
]
#: One non-COVID patient only: too few for a patient-safe split.
FEW = [MANY[0], MANY[1], MANY[5]]


def _seeded(root: Path, patients: list[tuple]) -> Path:
    settings = load_settings(env={}, data_dir=root / "data", pseudonym_key=KEY)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        seed(database, settings, Archive(settings.archive_dir), patients)
    finally:
        database.dispose()
    return settings.data_dir


def _export(data_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_PSEUDONYM_KEY=KEY, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "worker.cli", "dataset", "export", "--task", "covid-ct", "--out",
                           str(out), "--data-dir", str(data_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


def test_no_patient_is_on_both_sides_and_the_balance_is_shown(tmp_path: Path) -> None:
    data_dir = _seeded(tmp_path, MANY)
    done = _export(data_dir, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    with (tmp_path / "out" / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(p[6] for p in MANY) * SLICES
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of[row["patient"]].add(row["split"])
    assert len(splits_of) == len(MANY)
    assert {p: s for p, s in splits_of.items() if len(s) != 1} == {}  # no patient on both sides
    assert {row["split"] for row in rows} == {"Training", "Testing"}
    # The mixed patients' slices of both classes went with them.
    mixed = [p for p, labels in _labels_by_patient(rows).items() if len(labels) == 2]
    assert len(mixed) == 2
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    # Patients per split and class: each patient once per class they have series of (the two mixed ones twice).
    assert sum(n for per_class in summary["patients"].values() for n in per_class.values()) == len(MANY) + 2
    assert "Training: COVID=" in done.stdout and " patients" in done.stdout and "%)" in done.stdout


def _labels_by_patient(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        out[row["patient"]].add(row["label"])
    return out


def test_too_few_patients_in_a_class_is_refused(tmp_path: Path) -> None:
    data_dir = _seeded(tmp_path, FEW)
    refused = _export(data_dir, tmp_path / "out")
    assert refused.returncode == 2, refused.stdout
    assert "too few patients per class" in refused.stderr and "non-COVID has 1" in refused.stderr
    assert "at least 2 each" in refused.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
