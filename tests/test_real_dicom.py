"""The shipped classifiers on real scanner DICOM (../shared/data/real-dicom-dev), through the worker's own path.

Each series of the development set is routed, decoded, cropped, selected and aggregated exactly as a pushed series
is (:mod:`worker.evaluation` runs :func:`worker.inference.classify_series_files`), and must give the labelled
answer, or ``indeterminate`` / not applicable where the manifest says the series is out of the model's domain. The
series figures are held to the targets of the issue that set them (docs/results.md: the ``external`` split).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import DEFAULT_ROUTING_RULES
from models.inference import Classifier, default_model_dir
from models.tasks import BRAIN_TUMOR, COVID_CT, INDETERMINATE
from test_models_series import REAL
from worker.evaluation import NOT_APPLICABLE, OUT_OF_DOMAIN, evaluate_series, find_series, read_labels, score

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "bench" / "real-dicom-dev.labels.tsv"


@pytest.fixture(scope="module")
def labels() -> list[tuple[str, str]]:
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is missing")
    return read_labels(LABELS)


def _outcomes(task, labels):
    series = find_series(REAL, labels, task)
    classifier = Classifier.load(default_model_dir(task.name))
    return evaluate_series(series, task, classifier, DEFAULT_ROUTING_RULES), classifier


def test_covid_model_on_real_chest_ct(labels) -> None:
    outcomes, _ = _outcomes(COVID_CT, labels)
    by_name = {o.name.split(" [")[0]: o for o in outcomes}
    assert {o.expected for o in outcomes} == {"COVID", "non-COVID", OUT_OF_DOMAIN}
    for outcome in outcomes:
        if outcome.expected == OUT_OF_DOMAIN:
            # The abdomen slices (no lung; BodyPartExamined empty, so routing lets them through) are refused.
            assert outcome.result == INDETERMINATE and "too little lung" in (outcome.reason or ""), outcome
        else:
            assert outcome.result == outcome.expected, outcome
    # The 2007 lung-cancer series, called COVID at 0.77-0.90 before the lungs were cropped and the median taken:
    # clearly non-COVID now, on its lung slices only.
    pre_2020 = by_name["a/lung-pet-ct-dx/Lung_Dx-A0001-5mm"]
    assert pre_2020.suspicion < 0.2 and 30 <= pre_2020.slices_read < pre_2020.slices
    figures = score(outcomes, COVID_CT)
    assert figures["accuracy"] == 1.0 and figures["roc_auc"] == 1.0
    assert figures["sensitivity"] >= 0.9 and figures["specificity"] >= 0.9
    assert figures["max_negative_suspicion"] < 0.8
    assert figures["out_of_domain_handled"] == 1.0


def test_brain_model_on_real_mr(labels) -> None:
    outcomes, _ = _outcomes(BRAIN_TUMOR, labels)
    for outcome in outcomes:
        name = outcome.name
        if outcome.expected == "notumor":
            # Healthy volunteers' volumes (sagittal 3D T1, DTI b0): no tumour, though 3-16% of their slices look
            # suspicious on their own.
            assert outcome.result == "notumor" and outcome.suspicion < 0.5, outcome
            if "dcm_qa_xa30" in name:
                # A sagittal 3D T1 of 96 slices, 2 mm voxels: read as the 128 axial slices cut from it.
                assert outcome.slices == 128, outcome
        elif outcome.expected == OUT_OF_DOMAIN:
            # The abdomen CT goes to the COVID model, not this one.
            assert outcome.result == NOT_APPLICABLE, outcome
        elif "sag_3d_gre" in name:
            # Lateral slices through the ear (the manifest: outside the brain) are no brain: never a tumour class.
            assert outcome.result == INDETERMINATE and "no head" in (outcome.reason or ""), outcome
        else:
            # RIDER axial pairs of slices near the vertex, where the manifest sees no lesion: the label is the
            # patient's. Read as a brain, but two slices cannot rule a tumour out: indeterminate, never "notumor".
            assert outcome.result == INDETERMINATE and outcome.slices_read == outcome.slices == 2, outcome
            assert "too few to rule out a finding" in (outcome.reason or ""), outcome
    figures = score(outcomes, BRAIN_TUMOR)
    assert figures["out_of_domain_handled"] == 1.0
    assert figures["specificity"] == 1.0 and figures["max_negative_suspicion"] < 0.8


def test_evaluate_dicom_command_reports_and_records_the_external_split(tmp_path: Path, labels) -> None:
    model = tmp_path / "covid-ct"
    shutil.copytree(default_model_dir(COVID_CT.name), model)
    report = tmp_path / "external.json"
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "evaluate", "covid-ct", "--dicom", str(REAL), "--labels", str(LABELS),
         "--model", str(model), "--json", str(report), "--record-split", "external"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a/lung-pet-ct-dx/Lung_Dx-A0001-5mm" in run.stdout and "== series: n 5, accuracy 1.0" in run.stdout
    payload = json.loads(report.read_text())
    assert payload["series"]["n"] == 5 and len(payload["outcomes"]) == 7
    # Every slice's probabilities, and why a slice was not read, for analyses such as bench/slices_needed.py.
    lung_dx = next(o for o in payload["outcomes"] if o["name"] == "a/lung-pet-ct-dx/Lung_Dx-A0001-5mm")
    read = [s for s in lung_dx["slice_results"] if "excluded" not in s]
    assert len(lung_dx["slice_results"]) == lung_dx["slices"] == 64 and len(read) == lung_dx["slices_read"] == 40
    assert all(len(s["probabilities"]) == 2 and abs(sum(s["probabilities"]) - 1) < 1e-4 for s in read)
    assert {s["excluded"].split(" (")[0] for s in lung_dx["slice_results"] if s not in read} == {
        "too little lung in the slice", "unlike the training images"}
    drawn = subprocess.run([sys.executable, "bench/slices_needed.py", "covid-ct", str(report), "--min-read", "1",
                            "--k", "1", "--draws", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    # The development set's series are each right as read (AUC 1), and so are single slices drawn from them.
    assert "5 series with at least 1 slices read (4 positive)" in drawn.stdout
    assert [line.split()[:2] for line in drawn.stdout.splitlines()[-2:]] == [["1", "1.000"], ["all", "1.000"]]
    card = json.loads((model / "card.json").read_text())
    # The worker's decision replayed on the recorded slices gives the evaluation back, at the card's own domain
    # threshold and blended with itself; a threshold of 0 leaves every slice out.
    threshold = str(card["calibration"]["domain"]["threshold"])
    replayed = subprocess.run([sys.executable, "bench/slice_rules.py", "covid-ct", str(report), "--domain-threshold",
                               threshold, "0", "--blend", str(report), "--weights", "0.5"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    rows = {line.rsplit(maxsplit=7)[0]: line.split()[-7:] for line in replayed.stdout.splitlines()[2:]}
    assert list(rows) == ["as evaluated", f"domain <= {float(threshold):g}", "domain <= 0", "blend 0.5"], rows
    assert rows["as evaluated"][:5] == ["5/5", "1.000", "1.000", "1.000", "1.000"], rows
    assert rows[f"domain <= {float(threshold):g}"] == rows["blend 0.5"] == rows["as evaluated"], rows
    assert rows["domain <= 0"][0] == "0/5", rows
    assert card["metrics"]["external"]["accuracy"] == 1.0 and card["metrics"]["external"]["level"] == "series"
    # Series of the other task are skipped, not scored.
    assert all(o["expected"] in ("COVID", "non-COVID", OUT_OF_DOMAIN) for o in payload["outcomes"])


def test_evaluate_dicom_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # dicom-triage's own main in this process (the command above runs it as a child): five children would each
    # import TensorFlow, 5-7 s apiece on 2 cores, to print one line.
    from worker.cli import main

    def evaluate(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        return main(["evaluate", "covid-ct", *args]), capsys.readouterr().err

    missing = evaluate("--dicom", str(tmp_path / "nowhere"))
    assert missing[0] == 2 and "is not a folder" in missing[1]
    (tmp_path / "tree").mkdir()
    empty = evaluate("--dicom", str(tmp_path / "tree"))
    assert empty[0] == 2 and "no series under" in empty[1]
    bad_labels = tmp_path / "labels.tsv"
    bad_labels.write_text("a only-one-field\n")
    refused = evaluate("--dicom", str(tmp_path / "tree"), "--labels", str(bad_labels))
    assert refused[0] == 2 and "expected PATH-PREFIX<TAB>LABEL" in refused[1]
    both = evaluate("--dicom", str(tmp_path / "tree"), "--data", str(tmp_path))
    assert both[0] == 2 and "not both" in both[1]
    neither = evaluate()
    assert neither[0] == 2 and "--dicom" in neither[1]


def test_not_applicable_series_are_counted_as_refused(labels) -> None:
    # An MR series scored for the COVID task is not applicable (routing), which counts as handled out of domain.
    from worker.evaluation import SeriesOutcome

    figures = score([SeriesOutcome("x", OUT_OF_DOMAIN, NOT_APPLICABLE, None, None, "modality MR", 3, 0),
                     SeriesOutcome("y", OUT_OF_DOMAIN, "COVID", 0.9, None, None, 3, 3)], COVID_CT)
    assert figures["out_of_domain_handled"] == 0.5 and figures["n"] == 0 and figures["accuracy"] is None


def test_evaluate_reads_a_tree_of_odd_files_to_the_end(tmp_path: Path) -> None:
    # pydicom's own test files, each a series of its own: a chest CT cut to 85 mm, an RT dose whose Number of Frames
    # is '1A', an MR frame whose pixel data is cut short, a nuclear medicine JPEG 2000. None stops the run; none
    # gets a class.
    import pydicom

    from worker.evaluation import series_facts

    source = Path(pydicom.__file__).parent / "data" / "test_files"
    names = ("CT_small.dcm", "badVR.dcm", "MR_truncated.dcm", "JPEG2000.dcm")
    for name in names:
        folder = tmp_path / OUT_OF_DOMAIN / name.removesuffix(".dcm")
        folder.mkdir(parents=True)
        shutil.copy(source / name, folder / name)
    # ... and the chest slice again as a Secondary Capture, a captured picture: refused by its SOP class.
    from pydicom import dcmread

    captured = dcmread(source / "CT_small.dcm")
    captured.SOPClassUID = captured.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    captured.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    (tmp_path / OUT_OF_DOMAIN / "captured").mkdir()
    captured.save_as(tmp_path / OUT_OF_DOMAIN / "captured" / "captured.dcm")
    series = find_series(tmp_path, None, COVID_CT)
    assert len(series) == len(names) + 1
    bad_frames = next(s for s in series if s.name.endswith("badVR"))
    assert series_facts(bad_frames.paths).slice_count == 1
    outcomes = {o.name.rsplit("/", 1)[-1]: o
                for o in evaluate_series(series, COVID_CT, Classifier.load(default_model_dir(COVID_CT.name)),
                                         DEFAULT_ROUTING_RULES)}
    assert score(list(outcomes.values()), COVID_CT)["out_of_domain_handled"] == 1.0
    assert outcomes["CT_small"].result == INDETERMINATE and "part of a chest" in (outcomes["CT_small"].reason or "")
    assert outcomes["badVR"].result == NOT_APPLICABLE and "RTDOSE" in (outcomes["badVR"].reason or "")
    assert outcomes["JPEG2000"].result == NOT_APPLICABLE
    assert outcomes["captured"].result == NOT_APPLICABLE
    assert "SOP class Secondary Capture Image Storage is excluded" in (outcomes["captured"].reason or "")
