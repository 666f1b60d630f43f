"""Regenerate docs/results.md: the study's table beside our reproduction, our shipped models, CPU speed.

Runs on this machine's CPU (TensorFlow): evaluates the shipped models on the original image files with the
production ``evaluate`` code, runs the black-pixel threshold baseline (no gradient training, seconds), and times
inference and a short training run. Rows that need long training are read from ``--runs`` (docs/training-runs.json:
bench/train_gpu.py's ``results.json`` entries, and CPU runs recorded from their cards) when given, else marked as
not run.

    .venv/bin/python bench/results.py --data ../shared/data [--runs docs/training-runs.json] [--update-cards]
    .venv/bin/python bench/results.py --real-dicom-table   # after evaluate --dicom --record-split

docs/results.md below :data:`HAND_KEPT_MARKER` is kept by hand and left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.architectures import build_model
from models.card import ModelCard
from models.inference import Classifier, default_model_dir
from models.preprocessing import prepare_batch
from models.tasks import BRAIN_TUMOR, COVID_CT, get_task
from training.device import cpu_model
from training.evaluate import run_evaluate
from training.fit import TrainConfig, build_trainable, compile_for_training, one_hot
from worker.cli import main as cli_main

DATA_FOLDERS = {"brain-tumor": "brain-tumor-mri", "covid-ct": "covid-ct"}

#: The study's table: (key, dataset, method, study accuracy %, architecture, task, split we compare).
STUDY_ROWS = [
    ("study_brain", "brain-tumor MRI", "CNN from scratch, 64x64x3 (`study-brain-cnn`)", 94.13, "testing"),
    ("resnet50_brain", "brain-tumor MRI", "ResNet50, ImageNet weights, fine-tuned (`resnet50`)", 96.11, "testing"),
    ("study_covid", "COVID lung CT", "CNN from scratch, 256x256x1 (`study-covid-cnn`)", 95.60, "holdout"),
    ("threshold_covid", "COVID lung CT", "black-pixel thresholding, 120, nearest class mean (`threshold`)", 65.5,
     "holdout"),
    ("brain_cnn_on_covid", "COVID lung CT", "the brain CNN's architecture", 78.64, "holdout"),
    ("covid_cnn_on_brain", "brain-tumor MRI", "the COVID CNN's architecture", 88.00, "testing"),
]


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def threshold_baseline(data: Path, work: Path) -> dict[str, Any]:
    out = work / "threshold-covid"
    code = cli_main(["train", "covid-ct", "--data", str(data / DATA_FOLDERS["covid-ct"]), "--arch", "threshold",
                     "--out", str(out), "--cv", "5"])
    if code != 0:
        raise SystemExit(f"threshold baseline failed with exit code {code}")
    return ModelCard.load(out).metrics


def inference_speed(task: str, batches: int = 10, batch_size: int = 32) -> dict[str, float]:
    """Images/s at ``batch_size`` on this CPU: the model alone, and end-to-end from display images."""
    classifier = Classifier.load(default_model_dir(task))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(batch_size)]
    prepared = prepare_batch(images, classifier.card.input_spec)
    classifier.predict(images, batch_size)  # warm-up: graph tracing
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict_prepared(prepared)
    model_only = batches * batch_size / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict(images, batch_size)
    end_to_end = batches * batch_size / (time.perf_counter() - started)
    return {"model_images_per_s": model_only, "end_to_end_images_per_s": end_to_end}


def training_epoch_cost(task: str, train_images: int, steps: int = 6) -> dict[str, float]:
    """CPU and wall seconds per training epoch of the shipped architecture, from a short run of ``steps``."""
    card = ModelCard.load(default_model_dir(task))
    spec = card.input_spec
    config = TrainConfig(**{k: v for k, v in card.training["config"].items() if k != "augmentation"})
    model, _ = build_trainable(lambda: build_model(card.architecture, get_task(task), spec), config)
    steps_per_epoch = int(np.ceil(train_images / config.batch_size))
    trainable = compile_for_training(model, config, steps_per_epoch)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (config.batch_size * steps, *spec.shape)).astype(np.float32)
    y = one_hot(rng.integers(0, model.output_shape[-1], len(x)), model.output_shape[-1])
    trainable.fit(x[:config.batch_size * 2], y[:config.batch_size * 2], batch_size=config.batch_size, verbose=0)
    cpu, wall = time.process_time(), time.perf_counter()
    trainable.fit(x, y, batch_size=config.batch_size, verbose=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s_per_epoch": cpu / steps * steps_per_epoch, "wall_s_per_epoch": wall / steps * steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "epochs_run": card.training.get("epochs_run")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder holding brain-tumor-mri/ and covid-ct/")
    parser.add_argument("--work", type=Path, default=Path("artifacts/results"))
    parser.add_argument("--runs", type=Path, help="training runs by row key (docs/training-runs.json)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--update-cards", action="store_true",
                        help="write the CPU evaluation of the original files into the shipped cards' metrics")
    parser.add_argument("--real-dicom-table", action="store_true",
                        help="only rewrite the real-DICOM table from the cards (no evaluation, no timing)")
    args = parser.parse_args()
    if args.real_dicom_table:
        replace_real_dicom_table(args.out)
        print(f"rewrote the real-DICOM table of {args.out}")
        return
    if args.data is None:
        parser.error("--data is required (except with --real-dicom-table)")
    args.work.mkdir(parents=True, exist_ok=True)

    evaluations: dict[str, dict[str, Any]] = {}
    for task in (BRAIN_TUMOR.name, COVID_CT.name):
        report = args.work / f"evaluate-{task}.json"
        run_evaluate(get_task(task), args.data / DATA_FOLDERS[task], None, report, args.work, 32)
        evaluations[task] = json.loads(report.read_text())
        if args.update_cards:
            card = ModelCard.load(default_model_dir(task))
            for split, metrics in evaluations[task].items():
                if isinstance(metrics, dict) and "accuracy" in metrics and split != "cv5":
                    card.metrics[split] = {k: v for k, v in metrics.items() if k != "class_names"}
            card.save(default_model_dir(task))
    threshold = threshold_baseline(args.data, args.work)
    gpu = json.loads(args.runs.read_text()) if args.runs else {}
    speed = {task: inference_speed(task) for task in (BRAIN_TUMOR.name, COVID_CT.name)}
    epoch = {BRAIN_TUMOR.name: training_epoch_cost(BRAIN_TUMOR.name, 4852),
             COVID_CT.name: training_epoch_cost(COVID_CT.name, 1736)}
    load = os.getloadavg()[0]
    args.out.write_text(render(evaluations, threshold, gpu, speed, epoch, load) + "\n" + hand_kept(args.out),
                        encoding="utf-8")
    print(f"wrote {args.out}")


#: docs/results.md from this line on is written by hand (figures from benches and experiments that this script does
#: not run); regenerating keeps it as it is.
HAND_KEPT_MARKER = "<!-- Kept by hand from here on: bench/results.py regenerates only what is above. -->"


def hand_kept(path: Path) -> str:
    """The hand-kept part of ``path`` (from :data:`HAND_KEPT_MARKER` on), or the marker alone for a new file."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return text[text.index(HAND_KEPT_MARKER):] if HAND_KEPT_MARKER in text else HAND_KEPT_MARKER + "\n"


def replace_real_dicom_table(path: Path) -> None:
    """Rewrite only the real-DICOM table of ``path`` from the shipped cards (after ``evaluate --dicom
    --record-split``), leaving every other line as it is."""
    lines = path.read_text(encoding="utf-8").split("\n")
    heading = real_dicom_table()[0]
    start = lines.index(heading)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    cards = [ModelCard.load(default_model_dir(t)) for t in ("brain-tumor", "covid-ct")]
    path.write_text("\n".join(lines[:start] + real_dicom_table(*cards) + [""] + lines[end:]), encoding="utf-8")


def render(evaluations, threshold, gpu, speed, epoch, load) -> str:
    brain, covid = evaluations["brain-tumor"], evaluations["covid-ct"]
    brain_card, covid_card = (ModelCard.load(default_model_dir(t)) for t in ("brain-tumor", "covid-ct"))
    lines = ["# Results", "",
             "The tables down to the CPU speed are generated by `bench/results.py` (do not edit them by hand); the "
             "sections below its marker are kept by hand, each figure with the command that measured it. Accuracies "
             "of shipped models are from `dicom-triage evaluate` on the original image files (TensorFlow, CPU).", "",
             "## The study's table and our reproduction", "",
             "| dataset | method | study | ours | note |", "|---|---|---:|---:|---|"]
    for key, dataset, method, study, split in STUDY_ROWS:
        if key == "threshold_covid":
            ours = f"{pct(threshold['holdout']['accuracy'])} (cv5 {pct(threshold['cv5']['accuracy'])})"
            note = "our seeded, duplicate-aware 70/20/10 split; class means of the black-pixel fraction"
        elif key in gpu and "metrics" in gpu[key]:
            run = gpu[key]
            ours = pct(run["metrics"].get(split, {}).get("accuracy"))
            note = (f"{run.get('where', 'GPU (bench/train_gpu.py)')}, {run['epochs_run']} epochs in "
                    f"{run.get('gpu_seconds', run.get('seconds', 0)):.0f} s, ReduceLROnPlateau; inputs: "
                    f"{run.get('data', 'prepared here')}")
        else:
            ours, note = "not run", NOT_RUN.get(key, "GPU time spent on the shipped models; see below")
        lines.append(f"| {dataset} | {method} | {study:.2f}% | {ours} | {note} |")
    lines += ["", "## Our shipped models (`triage-cnn`)", "",
              "| task | split | n | accuracy | target | macro F1 | ROC AUC |", "|---|---|---:|---:|---:|---:|---:|"]
    targets = {"testing": "98.5%", "testing_dedup": "98.0%", "holdout": "98.0%", "cv5": "97.5% mean"}
    for task, results in (("brain-tumor", brain), ("covid-ct", covid)):
        for split in ("testing", "testing_dedup", "holdout"):
            if split in results:
                m = results[split]
                lines.append(f"| {task} | {split} | {m['n']} | {pct(m['accuracy'])} | {targets[split]} | "
                             f"{m['macro_f1']:.4f} | {m['roc_auc']:.4f} |")
        if "cv5" in results:
            cv = results["cv5"]
            lines.append(f"| {task} | cv5 (5 group-aware folds) | all | {pct(cv['accuracy'])} ± {pct(cv['std'])} | "
                         f"{targets['cv5']} | – | – |")
    lines += ["", "Model UIDs: brain-tumor `" + brain_card.uid + "`, covid-ct `" + covid_card.uid + "`.", ""]
    lines += real_dicom_table(brain_card, covid_card)
    lines += ["",
              "## Speed on this machine's CPU (2 cores, shared)", "",
              f"CPU: {cpu_model()}, {os.cpu_count()} cores. Load average when measured: {load:.1f} (other engineers' "
              "jobs share the cores). Sessions land on different processors and hosts (a COVID training epoch took "
              "~20 s on the AMD EPYC with AVX-512 BF16 of 2026-11-27 and 75-95 s on the AMD EPYC hosts of the two "
              "sessions before), so compare figures within one run.", "",
              "| task | input | inference, model only (img/s, batch 32) | inference, end to end from display images "
              "| training CPU s / epoch | training wall s / epoch | epochs the shipped run used "
              "| the shipped run on this CPU (min, estimated from a few steps unless measured; target 60) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for task, card in (("brain-tumor", brain_card), ("covid-ct", covid_card)):
        s, e = speed[task], epoch[task]
        spec = card.input_spec
        # A model trained on a CPU shows its own training time rather than the estimate from a few steps on random
        # inputs (no validation, no input pipeline: it missed the COVID run's 19.9 s per epoch by a fifth either way).
        trained_here = str(card.training.get("trained_on", "")).startswith("CPU")
        minutes = (f"{card.training['train_wall_seconds'] / 60:.0f} (measured)" if trained_here
                   else f"{e['wall_s_per_epoch'] * (e['epochs_run'] or 0) / 60:.0f}")
        lines.append(f"| {task} | {spec.height}x{spec.width}x{spec.channels} | {s['model_images_per_s']:.0f} | "
                     f"{s['end_to_end_images_per_s']:.0f} | {e['cpu_s_per_epoch']:.0f} | {e['wall_s_per_epoch']:.0f} | "
                     f"{e['epochs_run']} | {minutes} |")
    return "\n".join(lines) + "\n"


#: The series-level targets on real scanner DICOM (issue 17), by task.
REAL_TARGETS = {
    "covid-ct": "ROC AUC >= 0.95; sensitivity and specificity >= 90%; no pre-2020 chest above 0.8",
    "brain-tumor": "tumour vs none >= 90% right; no healthy series above 0.8",
}


def real_dicom_table(*cards: ModelCard) -> list[str]:
    """The cards' series-level splits on real DICOM (``external``: ../shared/data/real-dicom-dev; ``external_extra``:
    the 143-series collection of docs/real-dicom-sources.md; ``external_volunteers``: its 82-series volunteers
    collection), written by ``evaluate --dicom --record-split``."""
    lines = ["## Real scanner DICOM, per series, through the worker's path", "",
             "`dicom-triage evaluate TASK --dicom DIR --labels FILE --record-split SPLIT`; `external` is "
             "`../shared/data/real-dicom-dev` (`bench/real-dicom-dev.labels.tsv`), `external_extra` and "
             "`external_volunteers` the collections in `docs/real-dicom-sources.md` (not in CI). Sensitivity, "
             "specificity and AUC are over the series given a class or a tumour of no stated type (*type not "
             "given*: the sequence is not what the tumour classes were learned from); coverage is that share, the "
             "rest indeterminate (a pituitary finding on an axial post-contrast series among them); "
             "*finding* is finding against no finding.", "",
             "| task | split | series | accuracy (class) | coverage | type not given | finding right | sensitivity "
             "| specificity | ROC AUC | most suspicious negative | out of domain refused | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for card in cards:
        for split in ("external", "external_extra", "external_volunteers"):
            m = card.metrics.get(split)
            if not m:
                continue
            auc = "–" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
            worst = "–" if m.get("max_negative_suspicion") is None else f"{m['max_negative_suspicion']:.2f}"
            untyped = m.get("type_not_assessed", 0) if card.task == "brain-tumor" else "–"
            lines.append(f"| {card.task} | {split} | {m['n']} | {pct(m['accuracy'])} | {pct(m['coverage'])} | "
                         f"{untyped} | {pct(m['finding_accuracy'])} | {pct(m['sensitivity'])} | "
                         f"{pct(m['specificity'])} | {auc} | "
                         f"{worst} | {pct(m['out_of_domain_handled'])} of {m['out_of_domain_n']} | "
                         f"{REAL_TARGETS[card.task]} |")
    return lines


NOT_RUN = {
    "resnet50_brain": "not run: no ImageNet weights here (Keras' cache is empty, and the hosts that serve them, "
                      "storage.googleapis.com and huggingface.co, do not resolve from these machines); "
                      "`--weights imagenet` would train from scratch and say so",
}

if __name__ == "__main__":
    main()
