"""``dataset export`` on a real migrated database and archive: CT series made now from ../shared/data images with
distinctive patient names, IDs and birth dates, labelled through the review's own ``record_decision``.

Checks: the trainer's layout, the worker's preprocessing, one patient never in two splits, keyed pseudonyms, no
patient data or UID in any exported byte, the manifest, the filters, and clear refusals."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from config import load_settings
from dicom_io.archive import Archive
from dicom_io.synthesis import ct_series
from models.series import model_inputs
from models.tasks import COVID_CT
from test_registry_helpers import covid_files
from worker.db import Database, Instance, Job, JobState, Patient, Result, Series, Study, User, upgrade_database, utcnow
from worker.db.review import Decision, record_decision
from training.data import load_and_split
from worker.export import ExportError, Pseudonymizer, export_dataset
from worker.decoding import decode_series

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-pseudonym-key-0123456789"
#: (patient ID, name, birth date, true class, model label, decision or None for unreviewed, series count)
PATIENTS = [
    ("EXP-PID-1001", "Zyxwuv^Amelia", "19410203", "COVID", "COVID", Decision.CONFIRM, 2),
    ("EXP-PID-1002", "Qwertz^Bernard", "19520304", "COVID", "non-COVID", Decision.CORRECT, 1),
    ("EXP-PID-1003", "Plokij^Cecile", "19630405", "COVID", "COVID", Decision.CONFIRM, 1),
    ("EXP-PID-1004", "Mnbvcx^Dorian", "19740506", "non-COVID", "non-COVID", Decision.CONFIRM, 1),
    ("EXP-PID-1005", "Lkjhgf^Eliane", "19850607", "non-COVID", "COVID", Decision.CORRECT, 1),
    ("EXP-PID-1006", "Poiuyt^Fabien", "19960708", "non-COVID", "non-COVID", None, 1),
]
SLICES = 2


def seed(database: Database, settings, archive: Archive, patients: list[tuple] | None = None,
         offset: int = 0) -> dict[str, list[str]]:
    """Archive and classify every patient's series (``PATIENTS`` unless given; a truth of ``A|B`` gives the
    patient's series those labels in turn), and record the decisions; return series UIDs per patient."""
    series_by_patient: dict[str, list[str]] = {}
    with database.session() as session:
        reviewer = User(name="rad", role="radiologist", password_hash="x")
        session.add(reviewer)
        for pid, name, birth, truths, model_label, decision, count in (PATIENTS if patients is None else patients):
            patient = Patient(patient_id=pid, patient_name=name, birth_date=birth)
            session.add(patient)
            for number in range(count):
                truth = truths.split("|")[number % len(truths.split("|"))]
                datasets = ct_series(covid_files(truth, 100 + offset, SLICES), patient_id=pid, patient_name=name,
                                     study_instance_uid=generate_uid(), series_instance_uid=generate_uid())
                offset += SLICES
                for ds in datasets:
                    ds.PatientBirthDate = birth
                study = Study(study_instance_uid=str(datasets[0].StudyInstanceUID), patient=patient)
                series = Series(series_instance_uid=str(datasets[0].SeriesInstanceUID), study=study, modality="CT",
                                revision=1, pending=False)
                session.add_all([study, series])
                session.flush()
                for number, ds in enumerate(datasets, start=1):
                    stored = archive.store(ds)
                    session.add(Instance(sop_instance_uid=stored.sop_instance_uid, series=series,
                                         sop_class_uid=stored.sop_class_uid, instance_number=number,
                                         transfer_syntax_uid=stored.transfer_syntax_uid,
                                         archive_path=str(stored.path)))
                job = Job(series_pk=series.id, revision=1, state=JobState.DONE, task=COVID_CT.name,
                          series_last_received_at=utcnow())
                session.add(job)
                session.flush()
                shown = truth if decision is Decision.CONFIRM else model_label  # a confirmation keeps it
                result = Result(job_pk=job.id, series_pk=series.id, revision=1, task=COVID_CT.name, label=shown,
                                probabilities={shown: 0.9}, slice_probabilities=[], aggregation="test",
                                model_name="m", model_version="1", model_uid="2.25.7")
                session.add(result)
                session.flush()
                if decision is not None:
                    record_decision(session, result, reviewer, decision, truth)
                series_by_patient.setdefault(pid, []).append(series.series_instance_uid)
    return series_by_patient


@pytest.fixture(scope="module")
def archive_env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    settings = load_settings(env={}, data_dir=root / "data", pseudonym_key=KEY)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    series = seed(database, settings, Archive(settings.archive_dir))
    yield settings, database, series, root
    database.dispose()


def read_manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_confirmed_export_layout_split_and_preprocessing(archive_env) -> None:
    settings, database, series, root = archive_env
    out = root / "confirmed"
    result = export_dataset(database, settings, COVID_CT, out, confirmed_only=True)
    reviewed = [p for p in PATIENTS if p[5] is not None]
    assert len(result.series) == sum(p[6] for p in reviewed) == 6
    assert result.images == 6 * SLICES
    for split in ("Training", "Testing"):
        assert sorted(p.name for p in (out / split).iterdir()) == list(COVID_CT.class_names)
    rows = read_manifest(out)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(row["file"] for row in rows) == pngs and len(pngs) == result.images
    # Labels are the radiologists': corrections win over the model's label.
    truth_by_series = {uid: p[3] for p in PATIENTS for uid in series[p[0]]}
    pseudonyms = Pseudonymizer(KEY)
    for entry in result.series:
        assert entry["label"] == truth_by_series[entry["series_instance_uid"]]
        assert entry["label_source"] == "radiologist"
        assert entry["pseudo_series"] == pseudonyms.series(entry["series_instance_uid"])
    # One patient, one split; every class has patients on both sides.
    splits_of: dict[str, set[str]] = {}
    for row in rows:
        splits_of.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values()) and len(splits_of) == 5
    for class_name in COVID_CT.class_names:
        assert {r["split"] for r in rows if r["label"] == class_name} == {"Training", "Testing"}
    # The PNG is the model input the worker makes of that frame (display image, region, 8 bits).
    row = rows[0]
    uid = next(e["series_instance_uid"] for e in result.series if e["pseudo_series"] == row["series"])
    with database.session() as session:
        paths = session.scalars(select(Instance.archive_path).join(Series, Series.id == Instance.series_pk)
                                .where(Series.series_instance_uid == uid).order_by(Instance.id)).all()
    frames = decode_series([Path(p) for p in paths], COVID_CT)
    expected = model_inputs([frame.image for frame in frames], COVID_CT)[1][int(row["frame"]) - 1]
    exported = np.asarray(Image.open(out / row["file"]))
    assert exported.dtype == np.uint8
    np.testing.assert_array_equal(exported, expected)
    summary = json.loads((out / "export.json").read_text())
    assert summary["images"] == result.images and summary["manifest_sha256"] == result.manifest_sha256


def test_trainer_keeps_each_patient_in_one_part(archive_env) -> None:
    settings, database, _, root = archive_env
    out = root / "for-training"
    export_dataset(database, settings, COVID_CT, out, confirmed_only=False)
    rows = {row["file"]: row["patient"] for row in read_manifest(out)}
    splits = load_and_split(out, COVID_CT, seed=0, validation_fraction=0.5, progress=False)
    patient = [rows[splits.images.relative(i)] for i in range(len(splits.images))]
    for who in set(patient):
        members = [i for i, p in enumerate(patient) if p == who]
        assert len({int(splits.groups[i]) for i in members}) == 1  # grouped by the export's manifest
    parts = [{patient[i] for i in part} for part in (splits.train, splits.validation, splits.test)]
    assert all(not (a & b) for n, a in enumerate(parts) for b in parts[n + 1:]), parts


def test_no_patient_data_or_uid_in_any_exported_file(archive_env) -> None:
    settings, database, series, root = archive_env
    out = root / "scan"
    export_dataset(database, settings, COVID_CT, out, confirmed_only=False)
    forbidden: list[bytes] = []
    for pid, name, birth, *_ in PATIENTS:
        family, given = name.split("^")
        forbidden += [pid.encode(), name.encode(), family.encode(), given.encode(), birth.encode(),
                      f"{birth[:4]}-{birth[4:6]}-{birth[6:]}".encode()]
    forbidden += [uid.encode() for uids in series.values() for uid in uids]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        hits = [text for text in forbidden if text in data or text.lower() in data.lower()
                or text in path.as_posix().encode()]
        assert not hits, f"{path} holds {hits}"


def test_unreviewed_results_only_without_confirmed_only(archive_env) -> None:
    settings, database, series, root = archive_env
    result = export_dataset(database, settings, COVID_CT, root / "all", confirmed_only=False)
    sources = {e["series_instance_uid"]: e["label_source"] for e in result.series}
    unreviewed = series["EXP-PID-1006"][0]
    assert sources.pop(unreviewed) == "model" and set(sources.values()) == {"radiologist"}
    later = export_dataset(database, settings, COVID_CT, root / "later", since=date.today() + timedelta(days=1))
    assert later.images == 0 and read_manifest(root / "later") == []
    # Nothing received since then was left out either (it counted every unreviewed result, whenever received).
    assert later.unreviewed_left_out == 0
    assert export_dataset(database, settings, COVID_CT, root / "recent",
                          since=date.today() - timedelta(days=1)).unreviewed_left_out == 1


def test_pseudonyms_depend_on_the_key_and_refusals(archive_env) -> None:
    settings, database, _, root = archive_env
    first = export_dataset(database, settings, COVID_CT, root / "key1", confirmed_only=True)
    other = settings.model_copy(update={"pseudonym_key": type(settings.pseudonym_key)("another-key-9876543210")})
    second = export_dataset(database, other, COVID_CT, root / "key2", confirmed_only=True)
    assert {e["pseudo_series"] for e in first.series}.isdisjoint({e["pseudo_series"] for e in second.series})
    with pytest.raises(ExportError, match="not an empty folder"):
        export_dataset(database, settings, COVID_CT, root / "key1")
    assert len(read_manifest(root / "key1")) == first.images  # the refused export left it alone
    without_key = settings.model_copy(update={"pseudonym_key": None})
    with pytest.raises(ExportError, match="set pseudonym_key"):
        export_dataset(database, without_key, COVID_CT, root / "nokey")
    assert not (root / "nokey").exists()


def test_cli_export(archive_env) -> None:
    """Reviewed labels by default: the plain command exports only confirmed/corrected series and says how many
    unreviewed results it left out; ``--include-unreviewed`` adds them, and export.json counts the model's labels."""
    settings, _, _, root = archive_env
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_PSEUDONYM_KEY=KEY, CUDA_VISIBLE_DEVICES="")
    base = [sys.executable, "-m", "worker.cli", "dataset", "export", "--task", "covid-ct",
            "--data-dir", str(settings.data_dir)]

    def export(out: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, "--out", str(root / out), *flags], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    default = export("cli")
    assert default.returncode == 0, default.stderr
    assert "exported 12 images of 6 series" in default.stdout
    assert "left out 1 unreviewed results" in default.stdout
    summary = json.loads((root / "cli" / "export.json").read_text())
    assert (summary["model_labels"], summary["unreviewed_left_out"]) == (0, 1)
    assert {row["label_source"] for row in read_manifest(root / "cli")} == {"radiologist"}

    everything = export("cli-all", "--include-unreviewed")
    assert everything.returncode == 0, everything.stderr
    assert "exported 14 images of 7 series" in everything.stdout
    assert "2 images are labelled with the model's own unreviewed result" in everything.stdout
    summary = json.loads((root / "cli-all" / "export.json").read_text())
    assert summary["label_sources"] == {"radiologist": 12, "model": 2} and summary["unreviewed_left_out"] == 0

    old_flag = export("cli-old", "--confirmed-only")  # the old opt-in, now the default, still accepted
    assert old_flag.returncode == 0 and "exported 12 images of 6 series" in old_flag.stdout
    both = export("cli-both", "--confirmed-only", "--include-unreviewed")
    assert both.returncode == 2 and "contradict" in both.stderr and not (root / "cli-both").exists()
    bad = export("cli-bad", "--since", "yesterday")
    assert bad.returncode == 2 and "is not a date" in bad.stderr


def test_training_images_from_real_dicom_match_the_workers_input(tmp_path: Path) -> None:
    """Preprocessing parity: a real scanner series (whole field of view, HU) exported for training and read back by
    the trainer's loader gives, slice for slice, the very tensor the worker feeds the model, and the slices the
    worker leaves out (no lung) are not exported."""
    from models.inference import Classifier, default_model_dir
    from models.preprocessing import prepare_batch
    from test_models_series import REAL
    from training.data import load_image_folder
    from training.pipeline import prepared_array
    from worker.inference import classify_series_files

    files = sorted((REAL / "a" / "lung-pet-ct-dx" / "Lung_Dx-A0001-5mm").glob("*.dcm"))[::8]
    if not files:
        pytest.skip(f"no real chest CT under {REAL}")
    settings = load_settings(env={}, data_dir=tmp_path / "data", pseudonym_key=KEY)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    archive = Archive(settings.archive_dir)
    datasets = [dcmread(path) for path in files]
    with database.session() as session:
        reviewer = User(name="rad", role="radiologist", password_hash="x")
        patient = Patient(patient_id="EXP-REAL-1", patient_name="Real^Scan", birth_date="")
        study = Study(study_instance_uid=str(datasets[0].StudyInstanceUID), patient=patient)
        series = Series(series_instance_uid=str(datasets[0].SeriesInstanceUID), study=study, modality="CT",
                        revision=1, pending=False)
        session.add_all([reviewer, patient, study, series])
        session.flush()
        for number, ds in enumerate(datasets, start=1):
            stored = archive.store(ds)
            session.add(Instance(sop_instance_uid=stored.sop_instance_uid, series=series,
                                 sop_class_uid=stored.sop_class_uid, instance_number=number,
                                 transfer_syntax_uid=stored.transfer_syntax_uid, archive_path=str(stored.path)))
        job = Job(series_pk=series.id, revision=1, state=JobState.DONE, task=COVID_CT.name,
                  series_last_received_at=utcnow())
        session.add(job)
        session.flush()
        result = Result(job_pk=job.id, series_pk=series.id, revision=1, task=COVID_CT.name, label="non-COVID",
                        probabilities={"non-COVID": 0.9}, slice_probabilities=[], aggregation="test",
                        model_name="m", model_version="1", model_uid="2.25.7")
        session.add(result)
        session.flush()
        record_decision(session, result, reviewer, Decision.CONFIRM, "non-COVID")
    try:
        # One patient of one class: the parity is checked without the export's patients-per-class floor.
        export = export_dataset(database, settings, COVID_CT, tmp_path / "out", confirmed_only=True,
                                min_patients_per_class=0)
    finally:
        database.dispose()
    frames = decode_series(files, COVID_CT)
    regions, inputs = model_inputs([frame.image for frame in frames], COVID_CT)
    read = [i for i, region in enumerate(regions) if region.suitable]
    assert 0 < len(read) < len(frames)  # the apex and abdomen slices of the sample are left out
    assert export.images == len(read) and export.series[0]["slices_left_out"] == len(frames) - len(read)
    rows = read_manifest(tmp_path / "out")
    exported = load_image_folder(tmp_path / "out" / rows[0]["split"], COVID_CT, progress=False, allow_empty=True)
    by_file = {Path(p).name: image for p, image in zip(exported.paths, exported.images)}
    spec = Classifier.load(default_model_dir(COVID_CT.name)).card.input_spec
    for row in rows:
        index = int(row["frame"]) - 1
        assert index in read
        trainer = prepared_array([by_file[Path(row["file"]).name]], spec)  # the training tf.data pipeline
        worker = prepare_batch([inputs[index]], spec)
        np.testing.assert_array_equal(trainer, worker)
    # The worker's series result leaves out the same slices (and may leave out more: those unlike the training
    # images), so it reads only exported slices.
    classified = classify_series_files(files, Classifier.load(default_model_dir(COVID_CT.name)), batch_size=8)
    kept = {i for i, s in enumerate(classified.slice_probabilities) if "excluded" not in s}
    assert kept and kept <= set(read)
    assert all("excluded" in classified.slice_probabilities[i] for i in range(len(frames)) if i not in read)


def test_cli_from_dicom_tree(tmp_path: Path) -> None:
    """``dataset from-dicom``: a labelled tree of DICOM series outside the archive gives the same layout, keyed
    pseudonyms and one split per patient; out-of-domain series are left out; nothing of the headers leaks; an
    unlabelled tree is refused with the reason and leaves no folder."""
    tree = tmp_path / "tree"
    made: list[tuple[str, str, str]] = []  # (patient ID, name, series UID)
    offset = 0
    for label, folder in (("COVID", "b"), ("non-COVID", "a"), ("COVID", "e")):
        for patient in range(3):
            pid, name = f"TREE-{folder}-{patient}", f"Treeperson^Quillon{folder.upper()}{patient}"
            for series in range(2):  # two series per patient: they must land in one split
                datasets = ct_series(covid_files(label, 300 + offset, 2), patient_id=pid, patient_name=name,
                                     study_instance_uid=generate_uid(), series_instance_uid=generate_uid())
                offset += 2
                target = tree / folder / f"{patient}-{series}"
                target.mkdir(parents=True)
                for number, ds in enumerate(datasets):
                    ds.save_as(target / f"{number}.dcm", enforce_file_format=True)
                made.append((pid, name, str(datasets[0].SeriesInstanceUID)))
    labels = tmp_path / "labels.tsv"
    labels.write_text("# folder\tlabel\na\tnon-COVID\nb\tCOVID\ne\tout-of-domain\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_PSEUDONYM_KEY=KEY, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "worker.cli", "dataset", "from-dicom", "--task", "covid-ct", "--dicom",
               str(tree), "--labels", str(labels), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run([*command, "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported 24 images of 12 series" in done.stdout  # the 6 out-of-domain series are not exported
    rows = read_manifest(tmp_path / "out")
    assert {r["label"] for r in rows} == {"COVID", "non-COVID"} and {r["label_source"] for r in rows} == {"dataset"}
    assert len({r["patient"] for r in rows}) == 6
    for patient in {r["patient"] for r in rows}:
        assert len({r["split"] for r in rows if r["patient"] == patient}) == 1
    for row in rows:
        assert Image.open(tmp_path / "out" / row["file"]).mode == "L"
    forbidden = [text.encode() for pid, name, uid in made for text in (pid, name, uid, "Treeperson", "Quillon")]
    for path in (p for p in (tmp_path / "out").rglob("*") if p.is_file()):
        data = path.read_bytes() + path.as_posix().encode()
        assert not [text for text in forbidden if text in data], path

    (tmp_path / "none.tsv").write_text("e\tout-of-domain\n", encoding="utf-8")
    refused = subprocess.run([*command[:-4], "--labels", str(tmp_path / "none.tsv"), "--data-dir",
                              str(tmp_path / "data"), "--out", str(tmp_path / "refused")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "labelled with a class of covid-ct" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()
